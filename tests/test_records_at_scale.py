"""Sherlock records as columns in a cached, memory-mapped file; boxes mostly outside the image."""
import json
import logging
import multiprocessing
import os
import pickle
import shutil

import pytest
import torch

from engine.config import parse_recipe
from engine.data import DatasetError, make_tiny_sherlock
from engine.data import sherlock as sherlock_module
from engine.build import check_recipe_datasets
from engine.data.sherlock import build_sherlock
from engine.data.store import cache_paths, read_columns
from engine.registry import PROCESSORS

TRAIN = "sherlock_dataset/sherlock_train_v1_1.json"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny") / "sherlock")
    make_tiny_sherlock(root, num_train=16, num_val=8, seed=0, image_size=48)
    return root


def _copy(tiny_root, tmp_path, edit=None, name="copy"):
    root = str(tmp_path / name)
    shutil.copytree(tiny_root, root)
    for p in cache_paths(os.path.join(root, TRAIN), "sherlock"):  # start without a cache
        if os.path.exists(p):
            os.remove(p)
    if edit is not None:
        path = os.path.join(root, TRAIN)
        recs = json.load(open(path))
        edit(recs)
        with open(path, "w") as f:
            json.dump(recs, f)
    return root


def _build(root, split="train", **kw):
    return build_sherlock(split=split, is_train=False, root=root,
                          vis_processor=PROCESSORS.get("blip_image_eval")(image_size=32), prompt="Inference: ", **kw)


def _samples(ds):
    return [(ds.items[i], ds.annotation(i)) for i in range(len(ds))]


def _count_parses(monkeypatch, log_file):
    real = sherlock_module.parse_columns

    def counting(file, split=""):
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(file, split)

    monkeypatch.setattr(sherlock_module, "parse_columns", counting)


def test_records_are_parsed_once_then_mapped_from_the_cache(tiny_root, tmp_path, monkeypatch):
    root = _copy(tiny_root, tmp_path)
    parses = tmp_path / "parses.txt"
    _count_parses(monkeypatch, parses)
    first = _build(root)
    cache = cache_paths(os.path.join(root, TRAIN), "sherlock")[0]
    assert first.records_cache == cache and os.path.isfile(cache)
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(cache).st_mode & 0o777 == 0o666 & ~umask  # other users of a shared dataset can map it
    again = _build(root)
    assert len(parses.read_text().split()) == 1  # the second start mapped the file
    assert _samples(again) == _samples(first) and len(first) == 16
    recs = json.load(open(os.path.join(root, TRAIN)))
    it = again.items[3]
    assert (it.instance_id, it.inference, it.clue) == (
        recs[3]["instance_id"], recs[3]["targets"]["inference"], recs[3]["inputs"]["clue"])
    b = recs[3]["inputs"]["bboxes"][0]
    assert it.boxes == ((b["left"], b["top"], b["width"], b["height"]),)
    _, columns = read_columns(cache)
    assert all(not c.flags.writeable and not c.flags.owndata for c in columns.values())  # views of one map
    # An edited file is parsed again: the cache is keyed by the file's size, time and content.
    recs[3]["targets"]["inference"] = "a different inference"
    with open(os.path.join(root, TRAIN), "w") as f:
        json.dump(recs, f)
    assert _build(root).items[3].inference == "a different inference"
    assert len(parses.read_text().split()) == 2
    # A damaged cache is not trusted: parsed again and replaced.
    with open(cache, "r+b") as f:
        f.truncate(100)
    assert _build(root).items[3].inference == "a different inference"
    assert len(parses.read_text().split()) == 3 and os.path.getsize(cache) > 100


def test_workers_and_spawned_processes_map_the_same_file(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    ds = _build(root)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the path of the cache, not the columns
    clone = pickle.loads(blob)
    assert _samples(clone) == _samples(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda xs: xs)
    got = [s["sample_id"] for batch in loader for s in batch]
    assert got == [ds.annotation(i)["sample_id"] for i in range(len(ds))]


def _build_in_child(root, parses, out):
    import engine.data.sherlock as sh

    real = sh.parse_columns

    def counting(file, split=""):
        with open(parses, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(file, split)

    sh.parse_columns = counting
    ds = _build(root)
    with open(out, "a") as f:
        f.write(json.dumps([ds.annotation(i)["sample_id"] for i in range(len(ds))]) + "\n")


def test_ranks_starting_together_parse_once_and_never_see_a_partial_cache(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    parses, out = tmp_path / "parses.txt", tmp_path / "out.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(root, parses, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(parses.read_text().split()) == 1
    results = out.read_text().split("\n")[:-1]
    assert len(results) == 4 and len(set(results)) == 1
    folder = os.path.dirname(os.path.join(root, TRAIN))
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_a_cache_that_cannot_be_written_beside_the_file_goes_to_the_user_cache(tiny_root, tmp_path, monkeypatch):
    root = _copy(tiny_root, tmp_path)
    monkeypatch.setenv("BLIP2_ENGINE_CACHE", str(tmp_path / "user_cache"))
    beside, fallback = cache_paths(os.path.join(root, TRAIN), "sherlock")
    os.makedirs(beside)  # a folder where the cache file would go: writing it fails
    ds = _build(root)
    assert ds.records_cache == fallback and os.path.isfile(fallback) and len(ds) == 16


def test_duplicate_ids_and_bad_records_from_the_cache(tiny_root, tmp_path, caplog):
    def edit(recs):
        recs[9]["instance_id"] = recs[2]["instance_id"]
        recs[12]["instance_id"] = recs[2]["instance_id"]
        recs[5]["targets"]["inference"] = ""
        recs[6]["inputs"]["clue"] = ""

    root = _copy(tiny_root, tmp_path, edit)
    for _ in range(2):  # parsed, then from the cache: the same report
        with pytest.raises(DatasetError) as e:
            _build(root)
        assert "record 5" in str(e.value) and "1 bad records" in str(e.value)
        with caplog.at_level(logging.WARNING):
            ds = _build(root, max_bad_samples=1)
        assert len(ds) == 15
        dups = ds.duplicate_ids()
        assert [(d.where, d.id) for d in dups] == [("record 9", ds.items[2].instance_id),
                                                    ("record 12", ds.items[2].instance_id)]
        assert "also used by record 2" in str(dups[0])
        # The clue only matters in the text modes that use it.
        with pytest.raises(DatasetError, match="record 6.*inputs.clue is missing"):
            _build(root, text="clue_inference", max_bad_samples=1)
        assert len(_build(root, text="clue_inference", max_bad_samples=2)) == 14


# -- boxes mostly outside the image ----------------------------------------------------------------------


def _mostly_outside(recs):
    # Record 0's image is 64x48 (VCR-like); this box has 432 of its 8000 px^2 inside: 5.4%.
    recs[0]["inputs"]["bboxes"] = [{"left": 40, "top": 30, "width": 100, "height": 80}]
    # Record 1 overhangs a little (90% inside): clipped quietly, as before.
    w = recs[1]["inputs"]["image"]["width"]
    recs[1]["inputs"]["bboxes"] = [{"left": w - 27, "top": 10, "width": 30, "height": 20}]


def test_a_box_mostly_outside_is_a_warning_or_with_strictness_a_bad_record(tiny_root, tmp_path, caplog):
    root = _copy(tiny_root, tmp_path, _mostly_outside)
    rid = json.load(open(os.path.join(root, TRAIN)))[0]["instance_id"]
    with caplog.at_level(logging.WARNING, logger="engine.data.sherlock"):
        ds = _build(root)
    assert len(ds) == 16  # kept
    assert [(w.where, w.id) for w in ds.warnings] == [("record 0", rid)]
    text = caplog.text
    assert f"1 of 16 records in {os.path.join(root, TRAIN)} have warnings (1 box mostly outside the image)" in text
    assert f"record 0 (instance_id {rid}): box 0 = (40, 30, 100, 80) has 5.4% of its area inside the 64x48 image" \
        in text
    assert "record 1" not in text and "strict_boxes: true" in text
    with pytest.raises(DatasetError, match=r"(?s)record 0 .*5\.4% of its area inside.*max_bad_samples"):
        _build(root, strict_boxes=True)
    assert len(_build(root, strict_boxes=True, max_bad_samples=1)) == 15


def test_check_dataset_lists_boxes_mostly_outside_as_warnings(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path, _mostly_outside)
    data = {"model": {"arch": "blip2_opt", "model_type": "tiny"},
            "datasets": {"sherlock": {"root": root}}, "run": {"valid_splits": [], "train_splits": ["train"]}}
    report = check_recipe_datasets(parse_recipe(data, check_files=False))
    assert report.ok and [w.where for w in report.warnings] == ["record 0"]
    text = report.format()
    assert "WARNINGS: 1 records kept (1 box mostly outside the image" in text
    assert "has 5.4% of its area inside the 64x48 image" in text and "size read from the file" in text
    assert text.endswith("OK: no problems found besides the warnings.")
    data["datasets"]["sherlock"]["strict_boxes"] = True
    strict = check_recipe_datasets(parse_recipe(data, check_files=False))
    assert not strict.ok and strict.counts() == {"box_mostly_outside": 1}
