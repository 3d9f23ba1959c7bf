"""engine/data: processors, region rendering, the Sherlock dataset, the synthetic data, collate, sampler."""
import json
import logging
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DatasetError, ExactDistributedSampler, make_tiny_sherlock, render_region
from engine.data.collate import collate
from engine.data.processors import (CLIP_MEAN, CLIP_STD, GEOMETRIC_OPS, BlipCaptionProcessor,
                                    sample_crop_containing)
from engine.data.region import HIGHLIGHT_FILL, HIGHLIGHT_OUTLINE
from engine.data.sherlock import SherlockConfig, build_sherlock, url_to_path
from engine.registry import DATASETS, PROCESSORS

TRAIN = "sherlock_dataset/sherlock_train_v1_1.json"
VAL = "sherlock_dataset/sherlock_val_with_split_idxs_v1_1.json"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny") / "sherlock")
    make_tiny_sherlock(root, num_train=16, num_val=8, seed=0, image_size=48)
    return root


def _eval_proc(size=32):
    return PROCESSORS.get("blip_image_eval")(image_size=size)


def _build(root, split="train", **kw):
    kw.setdefault("vis_processor", _eval_proc())
    kw.setdefault("text_processor", None)
    kw.setdefault("prompt", "Inference: ")
    return build_sherlock(split=split, is_train=split == "train", root=root, **kw)


def _to_uint8(t):
    """Undo Normalize/ToTensor: [3, S, S] -> HxWx3 uint8."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((t * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


# -- URL -> file -------------------------------------------------------------

def test_url_to_path_vcr_and_vg():
    vcr, vg = "/d/vcr1images", "/d/vg/images"
    url = ("http://s3-us-west-2.amazonaws.com/ai2-rowanz/vcr1images/lsmdc_3023_DISTRICT_9/"
           "3023_DISTRICT_9_01.21.02.000-01.21.16.578@5.jpg")
    assert url_to_path(url, vcr, vg) == (
        "/d/vcr1images/lsmdc_3023_DISTRICT_9/3023_DISTRICT_9_01.21.02.000-01.21.16.578@5.jpg")
    assert url_to_path("https://cs.stanford.edu/people/rak248/VG_100K/2337.jpg", vcr, vg) == \
        "/d/vg/images/VG_100K/2337.jpg"
    assert url_to_path("https://cs.stanford.edu/people/rak248/VG_100K_2/2400001.jpg", vcr, vg) == \
        "/d/vg/images/VG_100K_2/2400001.jpg"


# -- region rendering ----------------------------------------------------------

def test_highlight_official_colours_only_in_box():
    img = Image.new("RGB", (100, 80), (100, 100, 100))
    out, boxes = render_region(img, [{"left": 20, "top": 10, "width": 30, "height": 40}], "highlight")
    a = np.asarray(out).astype(int)
    changed = np.argwhere((a != 100).any(-1))
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
    assert (x0, y0, x1, y1) == (20, 10, 50, 50)  # PIL rectangles include the end point
    assert tuple(a[30, 21]) == HIGHLIGHT_OUTLINE[:3]  # the 3 px green outline, inside the edge
    assert tuple(a[30, 22]) == HIGHLIGHT_OUTLINE[:3] and tuple(a[30, 23]) != HIGHLIGHT_OUTLINE[:3]
    alpha = HIGHLIGHT_FILL[3] / 255
    expect = [100 * (1 - alpha) + c * alpha for c in HIGHLIGHT_FILL[:3]]
    assert np.abs(a[30, 35] - expect).max() <= 1  # translucent pink fill
    assert boxes == [(20.0, 10.0, 30.0, 40.0)]


def test_crop_returns_box_region_and_moved_boxes():
    arr = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out, boxes = render_region(img, [(10, 5, 20, 30), (40, 20, 10, 10)], "crop", margin=0.0)
    assert np.array_equal(np.asarray(out), arr[5:35, 10:50])
    assert boxes == [(0.0, 0.0, 20.0, 30.0), (30.0, 15.0, 10.0, 10.0)]
    out, _ = render_region(img, [(10, 5, 20, 30)], "crop", margin=0.1)
    assert out.size == (24, 36)  # 2 px and 3 px more on each side


def test_blackout_others_and_clamping():
    arr = np.full((40, 50, 3), 200, dtype=np.uint8)
    out, boxes = render_region(Image.fromarray(arr), [(40, 30, 30, 30)], "blackout_others")
    o = np.asarray(out)
    assert boxes == [(40.0, 30.0, 10.0, 10.0)]  # clipped to the 50x40 image
    assert (o[30:, 40:] == 200).all() and o[:30].max() == 0 and o[:, :40].max() == 0
    same, _ = render_region(Image.fromarray(arr), [(1, 1, 5, 5)], "none")
    assert np.array_equal(np.asarray(same), arr)
    with pytest.raises(ValueError, match="highlight"):
        render_region(Image.fromarray(arr), [(1, 1, 5, 5)], "glow")


# -- processors -------------------------------------------------------------------

def test_registered_processor_names_and_defaults():
    for name in ("blip_image_train", "blip2_image_train", "blip_image_eval", "blip_caption"):
        assert name in PROCESSORS
    assert PROCESSORS.get("blip_image_train")().image_size == 384
    assert PROCESSORS.get("blip2_image_train")().image_size == 364
    assert PROCESSORS.get("blip_image_eval")().image_size == 384
    t = PROCESSORS.get("blip_image_eval")(image_size=24)(Image.new("RGB", (50, 30), (255, 0, 0)))
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.full((24, 24), (1 - CLIP_MEAN[0]) / CLIP_STD[0]))


def test_blip_caption_matches_lavis():
    cap = BlipCaptionProcessor()
    assert cap('A man (in a hat) said: "Hi!"  Really... ok~\n') == "a man in a hat said hi really ok"
    # LAVIS keeps commas, apostrophes, question marks, hyphens and slashes
    assert cap("Well-known, isn't it? Yes/No") == "well-known, isn't it? yes/no"
    assert BlipCaptionProcessor(max_words=3)("one two three four five") == "one two three"
    assert BlipCaptionProcessor(prompt="a picture of ")("Dog.") == "a picture of dog"


def test_region_crop_sampler_always_contains_box():
    torch.manual_seed(0)
    box = (180.0, 40.0, 20.0, 20.0)
    for _ in range(200):
        p = sample_crop_containing((200, 100), box, scale=(0.1, 0.3))
        if p is None:
            continue
        top, left, h, w = p
        assert left <= 180 and left + w >= 200 and top <= 40 and top + h >= 60
        assert left >= 0 and top >= 0 and left + w <= 200 and top + h <= 100


@pytest.mark.parametrize("name", ["blip2_image_train", "blip_image_train"])
def test_train_augmentation_keeps_edge_region_visible(name):
    torch.manual_seed(0)
    img = Image.new("RGB", (200, 100), (120, 120, 120))
    box = [(182, 40, 18, 20)]  # touching the right edge
    shown, boxes = render_region(img, box, "highlight")
    proc = PROCESSORS.get(name)(image_size=48, min_scale=0.1, max_scale=0.3)

    def visible(t):
        a = _to_uint8(t).astype(int)
        # the outline stays the greenest thing even after photometric RandAugment ops
        return ((a[..., 1] - a[..., 0] > 60) & (a[..., 1] - a[..., 2] > 60)).sum() >= 4

    with_region = [visible(proc(shown, region=boxes)) for _ in range(25)]
    without = [visible(proc(shown)) for _ in range(25)]
    assert all(with_region)
    assert not all(without)  # plain RandomResizedCrop does lose it: the test can fail


def test_blip_image_train_drops_geometric_ops_only_with_region():
    proc = PROCESSORS.get("blip_image_train")(image_size=32)
    names = {op.name for op in proc._randaug.ops}
    region_names = {op.name for op in proc._randaug_region.ops}
    assert set(GEOMETRIC_OPS) <= names and not set(GEOMETRIC_OPS) & region_names
    assert {"TranslateX", "TranslateY", "Equalize"} <= region_names


def test_flip_override():
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 40))  # left half white
    proc = PROCESSORS.get("blip2_image_train")(image_size=16, min_scale=1.0, max_scale=1.0)
    torch.manual_seed(0)
    left_white = [_to_uint8(proc(img, flip=False))[:, :4].mean() > 200 for _ in range(10)]
    assert all(left_white)
    flips = [_to_uint8(proc(img))[:, :4].mean() < 50 for _ in range(30)]
    assert any(flips) and not all(flips)


# -- Sherlock ---------------------------------------------------------------------

def test_schema_fields_have_help():
    import dataclasses

    assert DATASETS.get("sherlock").schema is SherlockConfig
    for f in dataclasses.fields(SherlockConfig):
        assert f.metadata.get("help"), f.name
    SherlockConfig()  # every field has a default


def test_sample_keys_and_text_modes(tiny_root, tmp_path):
    cap = BlipCaptionProcessor()
    rec = json.load(open(os.path.join(tiny_root, TRAIN)))[0]
    clue, inf = rec["inputs"]["clue"], rec["targets"]["inference"]
    ds = _build(tiny_root, text_processor=cap)
    s = ds[0]
    assert set(s) == {"image", "prompt", "text_output", "sample_id", "image_id", "references",
                      "split_idx", "clue", "inference"}
    assert s["image"].shape == (3, 32, 32) and s["sample_id"] == rec["instance_id"]
    assert s["image_id"] == "/".join(rec["inputs"]["image"]["url"].split("/")[-2:])
    assert (s["prompt"], s["text_output"], s["references"], s["split_idx"]) == ("Inference: ", inf, [inf], -1)

    ds = _build(tiny_root, text_processor=cap, text="clue_inference")
    assert ds[0]["prompt"] == "Inference: "
    assert ds[0]["text_output"] == f"clue: {clue} inference: {inf}"
    ds = _build(tiny_root, text_processor=None, text="clue_in_prompt")
    assert ds[0]["prompt"] == f"clue: {clue}. Inference: " and ds[0]["text_output"] == inf

    # the text processor cleans each free text; LAVIS's prompt of the processor leads the target
    def edit(recs):
        recs[0]["inputs"]["clue"], recs[0]["targets"]["inference"] = "A RED thing.", "Someone plays (a lot)!"
        return recs

    ds = _build(_copy_with(tiny_root, tmp_path, edit)[0], text_processor=None, text="clue_in_prompt")
    ds.text_processor = BlipCaptionProcessor(prompt="x ")
    ds.text = "clue_in_prompt"
    assert ds.annotation(0)["prompt"] == "clue: a red thing. Inference: "
    assert ds.annotation(0)["text_output"] == "x someone plays a lot"
    ds.text = "clue_inference"
    a = ds.annotation(0)
    assert a["text_output"] == "x clue: a red thing inference: someone plays a lot"
    assert a["references"] == ["clue: A RED thing. inference: Someone plays (a lot)!"]


def test_val_has_split_idx_and_test_falls_back_to_val(tiny_root):
    val = _build(tiny_root, "val")
    test = _build(tiny_root, "test")
    assert len(val) == len(test) == 8
    assert [val.annotation(i)["split_idx"] for i in range(8)] == [0] * 8
    assert _build(tiny_root, max_records=5).__len__() == 5


def test_synthetic_is_deterministic_and_reused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_tiny_sherlock(a, num_train=12, num_val=4, seed=3, image_size=40)
    make_tiny_sherlock(b, num_train=12, num_val=4, seed=3, image_size=40)
    for f in (TRAIN, VAL):
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
    recs = json.load(open(os.path.join(a, TRAIN)))
    kinds = set()
    for r in recs:
        url = r["inputs"]["image"]["url"]
        kinds.add("VG_100K_2" if "VG_100K_2" in url else "VG_100K" if "VG_100K" in url else "vcr")
        pa = url_to_path(url, os.path.join(a, "vcr1images"), os.path.join(a, "vg", "images"))
        pb = url_to_path(url, os.path.join(b, "vcr1images"), os.path.join(b, "vg", "images"))
        assert open(pa, "rb").read() == open(pb, "rb").read()
        assert set(r) == {"inputs", "targets", "instance_id"}
        assert set(r["inputs"]) == {"image", "bboxes", "clue", "confidence", "obs_idx"}
    assert kinds == {"vcr", "VG_100K", "VG_100K_2"}
    assert all("split_idx" in r for r in json.load(open(os.path.join(a, VAL))))
    mtime = os.path.getmtime(os.path.join(a, TRAIN))
    make_tiny_sherlock(a, num_train=12, num_val=4, seed=3, image_size=40)  # already there: no-op
    assert os.path.getmtime(os.path.join(a, TRAIN)) == mtime
    with pytest.raises(DatasetError, match="delete"):
        make_tiny_sherlock(a, num_train=13, num_val=4, seed=3, image_size=40)


def test_synthetic_through_builder_and_refuses_foreign_data(tmp_path):
    root = str(tmp_path / "gen")
    ds = _build(root, synthetic=10, synthetic_val=3)
    assert len(ds) == 10 and len(_build(root, "val", synthetic=10, synthetic_val=3)) == 3
    foreign = tmp_path / "real"
    (foreign / "vg").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not\\s+made by the generator"):
        make_tiny_sherlock(str(foreign), num_train=4, num_val=2)
    assert (foreign / "vg").exists()


def _gen(root):
    make_tiny_sherlock(root, num_train=40, num_val=8, seed=1, image_size=32)


def test_synthetic_concurrent_generation(tmp_path):
    root = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_gen, args=(root,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(_build(root)) == 40
    assert not [n for n in os.listdir(root) if n.startswith(".tiny_sherlock-")]  # temp folders gone


def _copy_with(tiny_root, tmp_path, edit):
    """A copy of the tiny dataset whose train file is ``edit(records)``."""
    root = str(tmp_path / "copy")
    shutil.copytree(tiny_root, root)
    path = os.path.join(root, TRAIN)
    recs = json.load(open(path))
    out = edit(recs)
    with open(path, "w") as f:
        f.write(out if isinstance(out, str) else json.dumps(out))
    return root, recs


def test_bad_records_are_named_with_fix(tiny_root, tmp_path):
    def edit(recs):
        recs[2]["targets"]["inference"] = "  "
        del recs[5]["targets"]
        recs[7]["inputs"]["image"]["url"] = recs[7]["inputs"]["image"]["url"].replace(".jpg", "_gone.jpg")
        recs[9]["inputs"]["bboxes"] = [{"left": 500, "top": 1, "width": 5, "height": 5}]
        return recs

    root, recs = _copy_with(tiny_root, tmp_path, edit)
    with pytest.raises(DatasetError) as e:
        _build(root)
    msg = str(e.value)
    assert os.path.join(root, TRAIN) in msg and msg.startswith("4 bad records")
    assert f"record 2 (instance_id {recs[2]['instance_id']}): targets.inference is missing or empty" in msg
    assert f"record 5 (instance_id {recs[5]['instance_id']}): targets is missing" in msg
    assert "record 7" in msg and "image file not found" in msg and "_gone.jpg" in msg
    assert "record 9" in msg and "outside" in msg
    assert "fix:" in msg and "max_bad_samples" in msg
    assert isinstance(e.value, ValueError)


def test_max_bad_samples_skips_with_count(tiny_root, tmp_path, caplog):
    def edit(recs):
        recs[1]["targets"]["inference"] = ""
        recs[3]["inputs"]["bboxes"] = []
        return recs

    root, _ = _copy_with(tiny_root, tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger="engine.data.sherlock"):
        ds = _build(root, max_bad_samples=2)
    assert len(ds) == 14
    assert "2 bad records" in caplog.text and "Skipping these 2 of 16 records" in caplog.text
    with pytest.raises(DatasetError, match="more than max_bad_samples=1"):
        _build(root, max_bad_samples=1)


def test_malformed_and_missing_files(tiny_root, tmp_path):
    root, _ = _copy_with(tiny_root, tmp_path, lambda recs: json.dumps(recs)[:-40])
    with pytest.raises(DatasetError, match=r"is not valid JSON \(line 1.*download it again"):
        _build(root)
    with pytest.raises(DatasetError, match=r"not found: .*nowhere.*allenai/sherlock"):
        _build(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="No image was found.*vcr_root"):
        _build(tiny_root, vcr_root="/no/vcr", vg_root="/no/vg")
    with pytest.raises(TypeError, match="did you mean 'region'"):
        _build(tiny_root, regoin="crop")


def test_unreadable_image_names_record(tiny_root, tmp_path):
    root, recs = _copy_with(tiny_root, tmp_path, lambda r: r)
    ds = _build(root)
    with open(ds.items[4].path, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DatasetError, match=f"record 4 \\(instance_id {recs[4]['instance_id']}\\)"):
        ds[4]
    assert len(ds.verify_images()) == 1


def test_collate_with_dataloader(tiny_root):
    ds = _build(tiny_root, vis_processor=PROCESSORS.get("blip2_image_train")(image_size=24))
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate,
                                         sampler=ExactDistributedSampler(len(ds), 1, 0))
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 24, 24)
    assert isinstance(batch["text_output"], list) and len(batch["sample_id"]) == 5
    assert batch["references"][0] == [batch["inference"][0]]


# -- sampler ----------------------------------------------------------------------

@pytest.mark.parametrize("world,n", [(2, 10), (2, 11), (3, 10), (3, 11), (3, 2)])
def test_sampler_each_index_once(world, n):
    for epoch in (0, 1):
        parts = []
        for r in range(world):
            s = ExactDistributedSampler(n, world, r, shuffle=True, seed=7)
            s.set_epoch(epoch)
            parts.append(list(s))
            assert len(s) == len(parts[-1])
        assert sorted(sum(parts, [])) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sampler_even_mode_deterministic_and_resumable():
    n, world = 11, 3
    ss = [ExactDistributedSampler(n, world, r, seed=1, even=True) for r in range(world)]
    parts = [list(s) for s in ss]
    flat = sum(parts, [])
    assert len(set(flat)) == len(flat) == 9 and {len(p) for p in parts} == {3}
    assert {s.num_batches(2, drop_last=False) for s in ss} == {2}
    assert parts[0] == list(ExactDistributedSampler(n, world, 0, seed=1, even=True))
    ss[0].set_epoch(1)
    assert list(ss[0]) != parts[0]
    order = list(ss[0])
    ss[0].set_start(2)
    assert list(ss[0]) == order[2:] and len(ss[0]) == 1
    state = ss[0].state_dict()
    fresh = ExactDistributedSampler(n, world, 0, seed=1, even=True)
    fresh.load_state_dict(state)
    assert list(fresh) == order[2:]
    fresh.set_epoch(2)
    assert len(fresh) == 3  # a new epoch starts from the beginning
    with pytest.raises(ValueError, match="num_replicas"):
        ExactDistributedSampler(n, 2, 0, seed=1, even=True).load_state_dict(state)
    assert list(ExactDistributedSampler(5, 2, 1, shuffle=False)) == [1, 3]


def _steps(n, world, batch, accum, epoch=0):
    """The optimizer steps of one epoch as lists of micro-batches (sample indices), over all ranks."""
    ranks = []
    for r in range(world):
        s = ExactDistributedSampler(n, world, r, seed=3, even=True, chunk=batch)
        s.set_epoch(epoch)
        order = list(s)
        ranks.append([order[i:i + batch] for i in range(0, len(order), batch)])
    steps = len(ranks[0]) // accum
    return [sorted(tuple(ranks[r][k]) for k in range(s * accum, (s + 1) * accum) for r in range(world))
            for s in range(steps)]


@pytest.mark.parametrize("n", [96, 101])
def test_training_steps_do_not_depend_on_the_number_of_ranks(n):
    # The same global batch (batch x ranks x accum = 16) gives the same micro-batches in every optimizer
    # step on 1, 2 or 4 ranks: a run can resume on another number of GPUs and continue the same training.
    one = _steps(n, 1, 4, 4, epoch=1)
    assert len(one) == n // 16
    assert _steps(n, 2, 4, 2, epoch=1) == one
    assert _steps(n, 4, 4, 1, epoch=1) == one
    assert _steps(n, 2, 4, 2, epoch=2) != one
    # chunks of a micro-batch, dealt round-robin: rank 1 of 2 takes positions 2-3, 6-7, ...
    assert list(ExactDistributedSampler(9, 2, 1, shuffle=False, even=True, chunk=2)) == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="chunk"):
        ExactDistributedSampler(9, 2, 1, chunk=2)
