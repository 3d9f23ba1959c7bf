"""COCO and JSONL datasets, mixing several datasets, uint8 normalisation, the dataset checker."""
import json
import logging
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError, parse_recipe
from engine.data import DatasetError, MixedDataset, make_tiny_sherlock
from engine.build import check_recipe_datasets
from engine.data.coco import build_coco_caption
from engine.data.collate import collate
from engine.data.jsonl import build_jsonl
from engine.data.normalize import image_stats, normalize_batch, on_device
from engine.data.processors import CLIP_MEAN, CLIP_STD, BlipCaptionProcessor
from engine.data.records import SAMPLE_KEYS
from engine.data.region import HIGHLIGHT_OUTLINE
from engine.data.sampler import ExactDistributedSampler, MixedDistributedSampler, training_sampler
from engine.build import build_split
from engine.registry import PROCESSORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(path, size=(32, 24), colour=(90, 120, 150)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=95)


def _eval_proc(size=16, **kw):
    return PROCESSORS.get("blip_image_eval")(image_size=size, **kw)


# -- COCO -------------------------------------------------------------------------


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    for name in ("train2014/COCO_train2014_000000000009.jpg", "train2014/COCO_train2014_000000000025.jpg",
                 "val2014/COCO_val2014_000000184613.jpg", "val2014/COCO_val2014_000000000042.jpg"):
        _jpeg(str(root / name))
    ann = root / "annotations"
    ann.mkdir()
    train = [{"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "A Dog, running!", "image_id": "coco_9"},
             {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "a brown dog", "image_id": "coco_9"},
             {"image": "train2014/COCO_train2014_000000000025.jpg", "caption": "a giraffe", "image_id": "coco_25"}]
    val = [{"image": "val2014/COCO_val2014_000000184613.jpg", "caption": ["A cat.", "a sleeping cat"]},
           {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["a bus"]}]
    (ann / "coco_karpathy_train.json").write_text(json.dumps(train))
    (ann / "coco_karpathy_val.json").write_text(json.dumps(val))
    (ann / "coco_karpathy_test.json").write_text(json.dumps(val[:1]))
    return str(root)


def _coco(root, split="train", **kw):
    kw.setdefault("vis_processor", _eval_proc())
    return build_coco_caption(split=split, is_train=split == "train", prompt="a photo of ", root=root, **kw)


def test_coco_train_and_eval_samples(coco_root):
    ds = _coco(coco_root, text_processor=BlipCaptionProcessor())
    assert len(ds) == 3
    s = ds[0]
    assert set(s) == set(SAMPLE_KEYS)
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    assert (s["prompt"], s["text_output"], s["image_id"], s["split_idx"]) == ("a photo of ", "a dog, running", "coco_9", -1)
    assert s["references"] == ["A Dog, running!", "a brown dog"]  # every caption of the image, raw
    assert len({ds.annotation(i)["sample_id"] for i in range(3)}) == 3
    val = _coco(coco_root, "val")
    assert len(val) == 2 and len(_coco(coco_root, "test")) == 1
    a = val.annotation(0)
    assert (a["sample_id"], a["image_id"], a["references"], a["text_output"]) == \
        ("184613", "184613", ["A cat.", "a sleeping cat"], "A cat.")
    assert val.ground_truth()["42"] == ["a bus"]


def test_coco_bad_records_named_with_fix(coco_root, caplog):
    path = os.path.join(coco_root, "annotations", "coco_karpathy_train.json")
    recs = json.load(open(path))
    recs[1]["caption"] = "  "
    recs[2]["image"] = "train2014/gone.jpg"
    recs.append(["not", "a", "record"])
    json.dump(recs, open(path, "w"))
    with pytest.raises(DatasetError) as e:
        _coco(coco_root)
    msg = str(e.value)
    assert msg.startswith(f"3 bad records in {path} (1 malformed record, 1 empty or missing target, 1 missing image)")
    assert "record 1 (image train2014/COCO_train2014_000000000009.jpg): caption is missing or empty (fix:" in msg
    assert "record 2 (image train2014/gone.jpg): image file not found" in msg
    assert "record 3 (image ?): is a JSON list" in msg and "max_bad_samples" in msg
    with caplog.at_level(logging.WARNING, logger="engine.data.coco"):
        assert len(_coco(coco_root, max_bad_samples=3)) == 1
    assert "Skipping these 3 of 4 records" in caplog.text

    open(path, "w").write('[{"image": "a.jpg",\n "caption": }]')
    with pytest.raises(DatasetError, match=r"coco_karpathy_train.json is not valid JSON \(line 2.*Fix:"):
        _coco(coco_root)
    with pytest.raises(DatasetError, match=r"not found: .*nowhere.*coco_karpathy_train.json.*cocodataset.org"):
        _coco(os.path.join(coco_root, "nowhere"))
    with pytest.raises(TypeError, match="did you mean 'ann_val'"):
        _coco(coco_root, ann_vale="x.json")


# -- JSONL ------------------------------------------------------------------------


def _write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


@pytest.fixture
def jsonl_root(tmp_path):
    root = tmp_path / "mine"
    for k in range(4):
        _jpeg(str(root / "imgs" / f"{k}.jpg"), size=(64, 48), colour=(100, 100, 100))
    _write_jsonl(root / "train.jsonl", [
        {"image": "imgs/0.jpg", "text": "A man waits.", "id": "a"},
        {"image": "imgs/1.jpg", "text": "a dog", "boxes": [[8, 8, 24, 16]], "prompt": "Q: ", "id": 7},
        "",
        {"image": "imgs/2.jpg", "text": "a tree"},
    ])
    _write_jsonl(root / "val.jsonl", [{"image": "imgs/3.jpg", "text": "a car", "id": "v0"}])
    return str(root)


def _jsonl(root, split="train", **kw):
    kw.setdefault("vis_processor", _eval_proc(64, normalize=False))
    return build_jsonl(split=split, is_train=split == "train", prompt="P: ", root=root, **kw)


def test_jsonl_samples_region_and_prompt(jsonl_root):
    ds = _jsonl(jsonl_root, text_processor=BlipCaptionProcessor())
    assert len(ds) == 3
    a0, a1, a2 = (ds.annotation(i) for i in range(3))
    assert (a0["prompt"], a0["text_output"], a0["sample_id"], a0["references"]) == ("P: ", "a man waits", "a",
                                                                                     ["A man waits."])
    assert (a1["prompt"], a1["sample_id"], a2["sample_id"]) == ("Q: ", "7", "train.jsonl:4")
    plain, boxed = ds[0]["image"], ds[1]["image"]
    assert plain.dtype == torch.uint8 and set(plain.flatten().tolist()) <= {99, 100, 101}
    img = boxed.permute(1, 2, 0).numpy().astype(int)
    assert tuple(img[16, 9]) == HIGHLIGHT_OUTLINE[:3] and tuple(img[40, 40]) == (100, 100, 100)
    none = _jsonl(jsonl_root, region="none")
    assert set(none[1]["image"].flatten().tolist()) <= {99, 100, 101}
    assert len(_jsonl(jsonl_root, "val")) == 1
    with pytest.raises(DatasetError, match="no test split: set datasets.jsonl.test_file"):
        _jsonl(jsonl_root, "test")


def test_jsonl_bad_lines_named_with_fix(jsonl_root):
    path = os.path.join(jsonl_root, "train.jsonl")
    _write_jsonl(path, [
        {"image": "imgs/0.jpg", "text": "ok", "id": "a"},
        '{"image": "imgs/1.jpg", "text": ',
        {"image": "imgs/1.jpg", "text": " ", "id": "b"},
        {"image": "imgs/9.jpg", "text": "gone", "id": "c"},
        {"image": "imgs/2.jpg", "text": "box", "boxes": [[1, 2, 3]], "id": "d"},
    ])
    with pytest.raises(DatasetError) as e:
        _jsonl(jsonl_root)
    msg = str(e.value)
    assert msg.startswith(f"4 bad records in {path}")
    assert "line 2 (id ?): not valid JSON" in msg
    assert "line 3 (id b): text is missing or empty (fix:" in msg
    assert "line 4 (id c): image file not found" in msg and "9.jpg" in msg
    assert "line 5 (id d): boxes[0] = [1, 2, 3] is not a [left, top, width, height] box" in msg
    assert len(_jsonl(jsonl_root, max_bad_samples=4)) == 1


# -- reduced JPEG decoding -----------------------------------------------------------


def test_draft_decode_matches_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.normal(128, 30, (75, 100, 3)).clip(0, 255)).astype(np.uint8)
    big = Image.fromarray(arr).resize((800, 600), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", "JPEG", quality=95)
    _write_jsonl(tmp_path / "train.jsonl", [{"image": "big.jpg", "text": "x", "boxes": [[100, 100, 300, 200]]}])
    proc = _eval_proc(64, normalize=False)
    assert proc.draft_factor((800, 600)) == 8 and proc.draft_factor((100, 60)) == 1
    train = PROCESSORS.get("blip2_image_train")(image_size=64)
    assert train.draft_factor((800, 600)) == 4  # its smallest crop is 367 px high
    ds = _jsonl(str(tmp_path), vis_processor=proc, region="none")
    full = proc(ds.load_image(0)).float()
    assert (ds[0]["image"].float() - full).abs().mean() < 2.0
    ds = _jsonl(str(tmp_path), vis_processor=proc, region="highlight")
    shown, boxes = ds.load_shown_image(0)
    assert shown.size == (100, 75) and boxes == [(12.5, 12.5, 37.5, 25.0)]


# -- mixing and samplers ---------------------------------------------------------------


class _Fake(torch.utils.data.Dataset):
    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "prompt": "", "text_output": self.tag,
                "sample_id": f"{self.tag}{i}", "image_id": "", "references": [], "split_idx": -1,
                "extra_" + self.tag: 1}


def test_mixed_sampler_ratios_and_equal_ranks():
    ds = MixedDataset({"a": _Fake("a", 10), "b": _Fake("b", 40)}, ratios={"a": 3, "b": 1})
    assert ds.epoch_length == 50 and ds.counts() == [38, 12]
    picks = Counter()
    for epoch in range(12):
        for world in (2, 3):
            parts = []
            for r in range(world):
                s = MixedDistributedSampler(ds, world, r, seed=5)
                s.set_epoch(epoch)
                parts.append(list(s))
            assert len({len(p) for p in parts}) == 1 and len(parts[0]) == 50 // world
            flat = sum(parts, [])
            if world == 2:
                picks.update(flat)
                # one epoch draws exactly its counts (nothing dropped with 2 ranks: 50 is even)
                assert sum(i < 10 for i in flat) == 38
    a = [picks[i] for i in range(10)]
    b = [picks[i] for i in range(10, 50)]
    assert max(a) - min(a) <= 1 and max(b) - min(b) <= 1  # no sample is drawn twice before all were drawn once
    assert sum(a) / (sum(a) + sum(b)) == pytest.approx(0.76, abs=0.005)  # 38 of 50 per epoch

    s1, s2 = MixedDistributedSampler(ds, 2, 0, seed=5), MixedDistributedSampler(ds, 2, 0, seed=5)
    assert list(s1) == list(s2)
    s2.set_epoch(1)
    assert list(s1) != list(s2)
    order = list(s2)
    s2.set_start(4)
    fresh = MixedDistributedSampler(ds, 2, 0, seed=5)
    fresh.load_state_dict(s2.state_dict())
    assert list(fresh) == order[4:]
    other = MixedDistributedSampler(MixedDataset({"a": _Fake("a", 10), "b": _Fake("b", 40)}, {"a": 1, "b": 1}), 2, 0)
    with pytest.raises(ValueError, match="train_dataset_ratios"):
        other.load_state_dict(s2.state_dict())

    assert isinstance(training_sampler(ds, 2, 0), MixedDistributedSampler)
    plain = MixedDataset({"a": _Fake("a", 10), "b": _Fake("b", 40)})
    s = training_sampler(plain, 3, 1)
    assert type(s) is ExactDistributedSampler and s.even and len(s) == 16
    batch = collate([plain[0], plain[12]])  # samples of both datasets in one batch: common keys only
    assert set(batch) == set(SAMPLE_KEYS) and batch["text_output"] == ["a", "b"]
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        MixedDataset({"a": _Fake("a", 3), "b": _Fake("b", 3)}, ratios={"a": 1})



class _Augmented(_Fake):
    """Returns the random draw its augmentation would make."""

    def __getitem__(self, i):
        return dict(super().__getitem__(i), text_output=f"{float(torch.rand(1)):.9f}")


def test_repeats_of_an_oversampled_sample_are_augmented_differently():
    from engine.trainer.seeding import SeededDataset, SeededSampler, sample_seed

    # b has 3 samples and is drawn 12 times an epoch: each of its samples 4 times.
    ds = MixedDataset({"a": _Augmented("a", 12), "b": _Augmented("b", 3)}, ratios={"a": 1, "b": 1}, epoch_length=24)
    assert ds.counts() == [12, 12]

    def epoch(world):
        out = []
        for r in range(world):
            s = MixedDistributedSampler(ds, world, r, seed=5, chunk=2)
            s.set_epoch(1)
            out += draws_of(s)
        return out

    def draws_of(sampler):
        return [(x["sample_id"], x["text_output"]) for x in map(SeededDataset(ds).__getitem__,
                                                                 SeededSampler(sampler, seed=5, epoch=1))]

    one = epoch(1)
    draws = {}
    for sample_id, draw in one:
        draws.setdefault(sample_id, []).append(draw)
    assert sorted(len(v) for k, v in draws.items() if k.startswith("b")) == [4, 4, 4]
    assert all(len(set(v)) == len(v) for v in draws.values())  # every repeat its own augmentation
    assert sorted(epoch(2)) == sorted(one)  # the same draws on 2 ranks
    tail = MixedDistributedSampler(ds, 1, 0, seed=5, chunk=2)
    tail.set_epoch(1)
    tail.set_start(10)
    assert draws_of(tail) == one[10:]  # and after a resume
    # A sample drawn once keeps the seed it always had: runs without oversampling are unchanged.
    plain = ExactDistributedSampler(6, 1, 0, seed=5)
    assert list(SeededSampler(plain, seed=5, epoch=1)) == [(i, sample_seed(5, 1, i)) for i in plain]
    assert sample_seed(5, 1, 4) == (5 * 1_000_003 + 1 * 10_007 + 4 * 7 + 12345) % (2**31 - 1)


def _recipe(datasets, run=None):
    data = {"model": {"arch": "blip2_opt", "model_type": "tiny", "image_size": 16},
            "datasets": datasets, "run": {"batch_size_train": 2, **(run or {})}}
    return parse_recipe(data, check_files=False)


def test_recipe_ratios_are_validated_and_built(tmp_path, jsonl_root):
    sher = str(tmp_path / "sher")
    make_tiny_sherlock(sher, num_train=12, num_val=4, seed=0, image_size=32)
    datasets = {"sherlock": {"root": sher}, "jsonl": {"root": jsonl_root}}
    with pytest.raises(ConfigError) as e:
        _recipe(datasets, {"train_dataset_ratios": {"sherlok": 1, "jsonl": 0}})
    msg = str(e.value)
    assert "run.train_dataset_ratios.sherlok: not a dataset of this recipe; did you mean 'sherlock'?" in msg
    assert "run.train_dataset_ratios.jsonl: 0 should be a positive number" in msg
    assert "no ratio for sherlock" in msg
    recipe = _recipe(datasets, {"train_dataset_ratios": {"sherlock": 1, "jsonl": 1}})
    train = build_split(recipe, "train", is_train=True)
    assert isinstance(train, MixedDataset) and train.counts() == [8, 7] and train.names == ["sherlock", "jsonl"]
    sampler = training_sampler(train, 1, 0, seed=0)
    batch = collate([train[i] for i in list(sampler)[:6]])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, 16, 16)  # uint8 out of workers
    assert image_stats(train) == (CLIP_MEAN, CLIP_STD)
    val = build_split(recipe, "val", is_train=False)
    assert isinstance(val, MixedDataset) and val.ratios is None and len(val) == 5
    assert val[0]["image"].dtype == torch.float32


def test_device_normalisation_matches_processor():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    u8 = _eval_proc(16, normalize=False)(img)
    f32 = _eval_proc(16)(img)
    batch = normalize_batch({"image": u8[None], "prompt": ["x"]}, (CLIP_MEAN, CLIP_STD), torch.device("cpu"))
    assert batch["image"].dtype == torch.float32 and torch.allclose(batch["image"][0], f32, atol=1e-5)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(f32, (u8.float() / 255 - mean) / std, atol=1e-5)
    loader = on_device([{"image": u8[None]}], MixedDataset({"a": _Fake("a", 1)}), "cpu")
    with pytest.raises(ValueError, match="uint8 images but no dataset"):
        list(loader)
    passthrough = normalize_batch({"image": f32[None]}, None, torch.device("cpu"))
    assert torch.equal(passthrough["image"][0], f32)


# -- checker ----------------------------------------------------------------------------


def _check_fixture(tmp_path, bad=True):
    root = tmp_path / "chk"
    for k in range(5):
        _jpeg(str(root / "imgs" / f"{k}.jpg"), size=(40, 30))
    lines = [{"image": f"imgs/{k}.jpg", "text": f"text {k}", "id": f"r{k}"} for k in range(4)]
    if bad:
        noise = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "imgs" / "big.jpg", "JPEG", quality=90)
        data = open(root / "imgs" / "big.jpg", "rb").read()
        open(root / "imgs" / "trunc.jpg", "wb").write(data[: len(data) // 2])  # header fine, pixels cut off
        open(root / "imgs" / "junk.jpg", "wb").write(b"not an image at all")
        lines += [{"image": "imgs/missing.jpg", "text": "gone", "id": "m"},
                  {"image": "imgs/1.jpg", "text": "", "id": "e"},
                  {"image": "imgs/2.jpg", "text": "box", "boxes": [[45, 2, 5, 5]], "id": "o"},  # image is 40 wide
                  {"image": "imgs/3.jpg", "text": "dup", "id": "r0"},
                  {"image": "imgs/trunc.jpg", "text": "trunc", "id": "t"},
                  {"image": "imgs/junk.jpg", "text": "junk", "id": "j"}]
    _write_jsonl(root / "train.jsonl", lines)
    _write_jsonl(root / "val.jsonl", lines[:2])
    recipe = {"model": {"arch": "blip2_opt", "model_type": "tiny"},
              "datasets": {"jsonl": {"root": str(root)}}, "run": {"test_splits": ["test"]}}
    return root, recipe


def test_check_finds_each_kind_and_passes_clean(tmp_path):
    root, data = _check_fixture(tmp_path)
    recipe = parse_recipe(data, check_files=False)
    fast = check_recipe_datasets(recipe)
    full = check_recipe_datasets(recipe, full_decode=True)
    assert fast.counts() == {"missing_file": 1, "missing_target": 1, "missing_image": 1, "undecodable_image": 1,
                             "box_outside": 1, "duplicate_id": 1}
    assert full.counts() == dict(fast.counts(), undecodable_image=2)
    text = full.format()
    train = os.path.join(str(root), "train.jsonl")
    assert f"{train} line 7 (id o): box(es) [0] lie outside the 40x30 image" in text
    assert f"{train} line 8 (id r0): id r0 is also used by line 1" in text
    assert f"{train} line 5 (id m): image file not found" in text
    assert f"{train} line 6 (id e): text is missing or empty" in text
    assert "trunc.jpg" in text and "junk.jpg" in text and "no test split" in text
    assert text.splitlines()[-1] != "OK: no problems found." and not full.ok

    clean_root, clean = _check_fixture(tmp_path / "clean", bad=False)
    report = check_recipe_datasets(parse_recipe(dict(clean, run={}), check_files=False), full_decode=True)
    assert report.ok and report.format().endswith("OK: no problems found.")


def test_check_dataset_tool_exit_status(tmp_path, capsys):
    import yaml

    _, data = _check_fixture(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, os.path.join("tools", "check_dataset.py"), "--recipe", str(path),
                           "--options", "run.test_splits=[]"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "PROBLEMS: 5 bad records" in proc.stdout and "missing image: 1" in proc.stdout
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import check_dataset
    finally:
        sys.path.pop(0)
    assert check_dataset.main(["--recipe", str(path), "--options", "datasets.jsonl.roo=x"]) == 2
    assert "did you mean 'root'" in capsys.readouterr().err


def test_randaugment_translate_nearest_is_exact():
    import random

    from timm.data.auto_augment import rand_augment_transform

    from engine.data.processors import RANDAUG_CONFIG, RANDAUG_HPARAMS, RANDAUG_OPS

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    bilinear = {op.name: op for op in rand_augment_transform(RANDAUG_CONFIG, dict(RANDAUG_HPARAMS),
                                                             transforms=list(RANDAUG_OPS)).ops}
    ours = {op.name: op for op in PROCESSORS.get("blip_image_train")(image_size=32)._randaug.ops}
    for name in ("TranslateX", "TranslateY"):
        assert ours[name].kwargs["resample"] == Image.NEAREST
        for op in (bilinear[name], ours[name]):
            op.prob = 1.0
        for seed in range(4):
            random.seed(seed)
            a = np.asarray(bilinear[name](img))
            random.seed(seed)
            assert np.array_equal(a, np.asarray(ours[name](img)))


def test_coco_records_come_from_the_cache_with_the_same_samples(coco_root, monkeypatch):
    import engine.data.coco as coco_module

    first = {split: _coco(coco_root, split) for split in ("train", "val")}
    assert all(ds.records_cache and os.path.isfile(ds.records_cache) for ds in first.values())
    monkeypatch.setattr(coco_module, "parse_columns", lambda *a: pytest.fail("parsed again"))
    for split, ds in first.items():
        again = _coco(coco_root, split)
        assert [again.annotation(i) for i in range(len(again))] == [ds.annotation(i) for i in range(len(ds))]
        assert [again.items[i].path for i in range(len(again))] == [ds.items[i].path for i in range(len(ds))]
    # A duplicate image in an evaluation file is reported, from the columns.
    path = os.path.join(coco_root, "annotations", "coco_karpathy_val.json")
    recs = json.load(open(path))
    json.dump(recs + [dict(recs[0])], open(path, "w"))
    monkeypatch.undo()
    dups = _coco(coco_root, "val").duplicate_ids()
    assert [(d.where, d.id) for d in dups] == [(f"record {len(recs)}", "184613")]
    assert "image 184613 is also used by record 0" in str(dups[0])


def test_jsonl_records_come_from_the_cache_with_the_same_samples(jsonl_root, monkeypatch):
    import engine.data.jsonl as jsonl_module

    ds = _jsonl(jsonl_root)
    assert ds.records_cache and os.path.isfile(ds.records_cache)
    monkeypatch.setattr(jsonl_module, "parse_columns", lambda *a: pytest.fail("parsed again"))
    again = _jsonl(jsonl_root)
    assert [again.items[i] for i in range(len(again))] == [ds.items[i] for i in range(len(ds))]
    assert [again.annotation(i) for i in range(len(again))] == [ds.annotation(i) for i in range(len(ds))]
    assert again.items[1].boxes == ((8.0, 8.0, 24.0, 16.0),) and again.items[1].prompt == "Q: "
    assert again.items[0].prompt is None and again.items[2].sample_id == "train.jsonl:4"
