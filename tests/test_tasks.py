"""engine.tasks: caption metrics against pycocoevalcap itself, the Sherlock leaderboard's
retrieval definitions, and the evaluation loops on fake models (1 and 2 ranks).

METEOR's JVM takes ~10 s to load its paraphrase table, so it is started once, by
the test that compares with pycocoevalcap; the other tests stub it.
"""
import os
import shutil
import socket

import numpy as np
import pytest
import torch

from engine.tasks import (
    CaptioningTask,
    SherlockRetrievalTask,
    aggregate_metric,
    build_groups,
    caption_metrics,
    evaluate_captioning,
    retrieval_metrics,
    retrieval_metrics_grouped,
    score_retrieval,
    score_retrieval_detailed,
)
from engine.tasks.metrics import _one_line

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")

# ---------------------------------------------------------------- caption data
# Arbitrary string ids (not COCO ints), several references each, punctuation and
# capitals so the PTB tokenizer has work to do.
REFS = {
    "vcr/12#0": ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore.",
                 "Someone on horseback, by the sea."],
    "vg-7": ["Two dogs play with a red ball in the park.", "A pair of dogs chase a ball on the grass!",
             "dogs playing fetch"],
    "a": ["The kitchen is messy; someone cooked recently.", "Dirty dishes fill the sink.",
          "It looks like a meal was just prepared."],
    "zz_last": ["She is waiting for a bus.", "A woman stands at a bus stop, waiting.",
                "the woman is going to take the bus"],
    "m3": ["It is raining outside.", "The street is wet from the rain.", "A rainy day in the city."],
}
HYPS = {  # imperfect predictions, in a deliberately unsorted order
    "zz_last": "a woman waiting at the bus stop",
    "a": "someone just cooked in the kitchen.",
    "vg-7": "two dogs playing with a ball",
    "m3": "the street is wet",
    "vcr/12#0": "a man riding a horse on a beach",
}
ORDER = sorted(REFS)


@needs_java
def test_caption_metrics_equal_pycocoevalcap(monkeypatch, caplog):
    import pycocoevalcap.meteor.meteor as meteor_mod
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # pycocoevalcap called directly, the way its COCOEvalCap does
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in REFS[i]] for i in HYPS})
    res = tok.tokenize({i: [{"caption": HYPS[i]}] for i in HYPS})
    bleu, _ = Bleu(4).compute_score(gts, res)
    want = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], bleu))
    want["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    want["CIDEr"], _ = Cider().compute_score(gts, res)

    # METEOR's JVM takes ~10 s to start, so the reference METEOR score comes from the
    # same process caption_metrics starts: scored on the reference's own tokenization.
    started, Meteor = [], meteor_mod.Meteor

    class ReferenceMeteor(Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

        def compute_score(self, gts_, res_):
            want["METEOR"], _ = Meteor.compute_score(self, gts, res)
            return super().compute_score(gts_, res_)

    monkeypatch.setattr(meteor_mod, "Meteor", ReferenceMeteor)
    caplog.set_level("INFO", logger="engine.tasks.metrics")
    ours = caption_metrics(HYPS, REFS)

    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert ours == {k: float(want[k]) for k in ours}  # exact float equality
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0
    assert [r.message for r in caplog.records if "SPICE" in r.message] == ["SPICE skipped: not requested (spice=False)"]
    assert len(started) == 1 and started[0].meteor_p.poll() is not None  # METEOR's Java process is gone


class _NoMeteor:
    """Stands in for METEOR where its JVM start-up (~10 s) buys the test nothing."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


@needs_java
@pytest.mark.timeout(120)
def test_meteor_failure_raises_and_never_hangs(monkeypatch):
    import gc
    import subprocess
    import sys
    import threading

    import pycocoevalcap.meteor.meteor as meteor_mod

    made = []

    class BrokenMeteor(meteor_mod.Meteor):  # a JVM that dies at start-up (e.g. out of memory)
        def __init__(self):
            self.meteor_p = subprocess.Popen(
                [sys.executable, "-c", "import sys; sys.stderr.write('no paraphrase table'); sys.exit(3)"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.lock = threading.Lock()
            made.append(self)

    monkeypatch.setattr(meteor_mod, "Meteor", BrokenMeteor)
    with pytest.raises(RuntimeError, match="no paraphrase table"):
        caption_metrics(HYPS, REFS)
    # pycocoevalcap's compute_score left its lock held; its __del__ would block on it forever
    assert not made[0].lock.locked() and made[0].meteor_p.poll() is not None
    made.clear()
    gc.collect()


def test_caption_metrics_input_errors():
    with pytest.raises(ValueError, match="empty"):
        caption_metrics({}, REFS)
    with pytest.raises(ValueError, match=r"2 prediction id\(s\) have no references: 'nope', 'm3'"):
        caption_metrics({"nope": "x", "m3": "y", "a": "z"}, {**REFS, "m3": []})
    with pytest.raises(TypeError, match="'a'"):
        caption_metrics({"a": None}, REFS)


def test_one_line_keeps_ptb_lines_aligned():
    # A '\r' or U+2028 would be a line break to the PTB tokenizer and shift captions onto wrong ids.
    assert _one_line("a\r\nb\u2028c\nd  e") == "a b c d  e"


def test_aggregate_metric():
    m = {"Bleu_4": 0.25, "CIDEr": 1.5, "im2txt_mean_rank": 3.0}
    assert aggregate_metric(m, "CIDEr") == 1.5
    assert aggregate_metric(m, "CIDEr + Bleu_4") == 1.75
    assert aggregate_metric(m, "im2txt_mean_rank", lower_is_better=["im2txt_mean_rank"]) == -3.0
    with pytest.raises(ValueError, match=r"'Cider' \(did you mean 'CIDEr'\?\).*Valid keys: Bleu_4, CIDEr"):
        aggregate_metric(m, "Cider+Bleu_4")
    with pytest.raises(ValueError, match="malformed"):
        aggregate_metric(m, "CIDEr+")
    with pytest.raises(ValueError, match="unknown key"):
        CaptioningTask(best_metric="BLEU4")
    assert SherlockRetrievalTask(best_metric="txt2im_mean_rank").best_score(
        {"txt2im_mean_rank": 2.0, "im2txt_mean_rank": 1.0, "p_at_1": 50.0}) == -2.0


# ---------------------------------------------------------------- evaluate_captioning
def _img(idx, n=1):
    """Images whose first pixel carries the sample's position in ORDER."""
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, 0, 0] = torch.as_tensor(idx, dtype=torch.float32)
    return x


def _caption_batch(ids):
    idx = [ORDER.index(i) for i in ids]
    return {"image": _img(idx, len(ids)), "prompt": ["Inference: "] * len(ids),
            "text_output": [REFS[i][0] for i in ids], "sample_id": list(ids), "image_id": [f"img-{i}" for i in ids],
            "references": [REFS[i] for i in ids], "split_idx": [-1] * len(ids)}


class FakeCaptioner(torch.nn.Module):
    """Deterministic: 'generates' the first reference of the sample its image encodes."""

    dtype = torch.float64

    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, image, prompt, **kw):
        assert not self.training and not torch.is_grad_enabled()
        self.calls.append((image.dtype, kw))
        return [REFS[ORDER[int(v)]][0] for v in image[:, 0, 0, 0]]


@needs_java
def test_evaluate_captioning_dedups_sorts_and_scores(monkeypatch, caplog):
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", _NoMeteor)
    monkeypatch.setattr("engine.tasks.metrics._SPICE_CORENLP_JARS", ("not-downloaded.jar",))
    # Out of order, and 'a' repeated the way a DistributedSampler pads its last shard.
    loader = [_caption_batch(["zz_last", "m3"]), _caption_batch(["a", "vcr/12#0"]), _caption_batch(["vg-7", "a"])]
    model = FakeCaptioner().train()
    records, metrics = evaluate_captioning(model, loader, device="cpu", num_beams=3, max_len=20, min_len=2,
                                           repetition_penalty=1.5, length_penalty=0.5, spice=True)
    assert [r["sample_id"] for r in records] == ORDER
    assert records[0] == {"image_id": "img-a", "caption": REFS["a"][0], "sample_id": "a"}
    # perfect predictions (each equals one of its references)
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and metrics["ROUGE_L"] == 1.0
    assert metrics["CIDEr"] > 0
    assert "SPICE" not in metrics
    spice_lines = [r.message for r in caplog.records if "SPICE" in r.message]
    assert len(spice_lines) == 1 and spice_lines[0].startswith("SPICE skipped: Stanford CoreNLP jars not-downloaded.jar")
    assert model.training  # the training flag is restored
    dtype, kw = model.calls[0]
    assert dtype == torch.float64  # cast to the model's dtype
    assert kw == dict(num_beams=3, max_len=20, min_len=2, repetition_penalty=1.5, length_penalty=0.5,
                      synced_gpus=False, length_counting="lavis")


def test_evaluate_captioning_without_references_returns_no_metrics():
    batch = _caption_batch(["m3", "a"])
    batch["references"] = [[], []]
    records, metrics = evaluate_captioning(FakeCaptioner(), [batch], device="cpu", dtype=torch.float32)
    assert [r["sample_id"] for r in records] == ["a", "m3"] and metrics is None


def test_tasks_are_registered(monkeypatch):
    import engine.registry as registry
    from engine.registry import TASKS

    monkeypatch.setattr(registry, "_populated", True)  # ours only; don't import the model/data packages

    assert TASKS.get("captioning").obj is CaptioningTask
    assert TASKS.get("sherlock_retrieval").obj is SherlockRetrievalTask


# ---------------------------------------------------------------- retrieval metrics
def _official(sim):
    """The leaderboard's definitions written out: rank = 1 + #better + (#tied others) / 2."""
    sim = np.asarray(sim, dtype=np.float64)
    n = len(sim)
    im2txt, txt2im = np.empty(n), np.empty(n)
    for i in range(n):
        row, col, d = sim[i], sim[:, i], sim[i, i]
        im2txt[i] = 1 + np.sum(row > d) + (np.sum(row == d) - 1) / 2
        txt2im[i] = 1 + np.sum(col > d) + (np.sum(col == d) - 1) / 2
        # cross-check the counting with a descending argsort and explicit tie averaging
        order = np.argsort(-row, kind="stable")
        positions = [p + 1 for p, j in enumerate(order) if row[j] == d]
        assert im2txt[i] == np.mean(positions)
    return {"im2txt_mean_rank": im2txt.mean(), "txt2im_mean_rank": txt2im.mean(),
            "p_at_1": 100 * np.mean(im2txt == 1)}


def test_retrieval_matches_official_definitions():
    rng = np.random.default_rng(0)
    for n in (2, 5, 17):
        for sim in (rng.normal(size=(n, n)), rng.integers(0, 3, size=(n, n)).astype(np.float32)):  # ties too
            got, want = retrieval_metrics(sim), _official(sim)
            assert got.keys() == want.keys()
            for k in got:
                assert got[k] == pytest.approx(want[k], abs=1e-12)


def test_retrieval_edge_cases():
    n = 6
    assert retrieval_metrics(np.eye(n)) == {"im2txt_mean_rank": 1.0, "txt2im_mean_rank": 1.0, "p_at_1": 100.0}
    assert retrieval_metrics(-np.eye(n)) == {"im2txt_mean_rank": n, "txt2im_mean_rank": n, "p_at_1": 0.0}
    assert retrieval_metrics(np.ones((2, 2))) == {"im2txt_mean_rank": 1.5, "txt2im_mean_rank": 1.5, "p_at_1": 0.0}
    # rows are im->txt, columns txt->im: the directions are not interchangeable
    assert retrieval_metrics(np.array([[1.0, 2.0], [0.0, 3.0]])) == {
        "im2txt_mean_rank": 1.5, "txt2im_mean_rank": 1.0, "p_at_1": 50.0}
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_retrieval_grouped_is_plain_mean():
    rng = np.random.default_rng(1)
    groups = [rng.normal(size=(n, n)) for n in (3, 10, 4)]
    per = [retrieval_metrics(g) for g in groups]
    got = retrieval_metrics_grouped(groups)
    for k in got:  # unweighted by group size
        assert got[k] == pytest.approx(sum(p[k] for p in per) / 3, abs=1e-12)


def test_build_groups():
    assert build_groups([2, 0, 2, 0, 1, 1], None) == [[1, 3], [4, 5], [0, 2]]
    assert build_groups([-1] * 7, 3) == [[0, 1, 2], [3, 4, 5]]  # the single trailing sample is dropped
    assert build_groups([5, 5, -1, -1], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="set group_size"):
        build_groups([-1, -1, 0], None)


# ---------------------------------------------------------------- score_retrieval
N_RET = 7
SPLITS = [0, 1, 0, 1, 0, 1, 1]


def _pair_score(i, j):
    """Sample i's image with sample j's text; a few ties and some wrong winners on purpose."""
    return float(-abs(i - j) + (0.5 if (i + j) % 3 == 0 else 0.0))


def _ret_batch(idx):
    return {"image": _img(idx, len(idx)), "prompt": [f"p{i}" for i in idx], "text_output": [f"t{i}" for i in idx],
            "sample_id": [f"s{i}" for i in idx], "image_id": [f"img{i}" for i in idx],
            "references": [[f"t{i}"] for i in idx], "split_idx": [SPLITS[i] for i in idx]}


def _expected_retrieval():
    groups = [[i for i in range(N_RET) if SPLITS[i] == s] for s in (0, 1)]
    return retrieval_metrics_grouped([np.array([[_pair_score(i, j) for j in g] for i in g]) for g in groups])


class FakeScorer(torch.nn.Module):
    def __init__(self, embeds: bool):
        super().__init__()
        self.n_encoded, self.n_score_calls = 0, 0
        if embeds:
            self.encode_image = self._encode
            self.score_with_image_embeds = self._score

    def _encode(self, image):
        self.n_encoded += len(image)
        return (image[:, 0, 0, 0].unsqueeze(1) * 10, {"idx": image[:, 0, 0, 0]})  # any tensor structure

    def _score(self, emb, prompt, text):
        self.n_score_calls += 1
        idx = emb[1]["idx"]
        assert torch.equal(emb[0][:, 0], idx * 10)
        assert prompt == [f"p{int(i)}" for i in idx]  # the prompt travels with the image
        return torch.tensor([_pair_score(int(i), int(t[1:])) for i, t in zip(idx, text)])

    def score(self, image, prompt, text):
        self.n_score_calls += 1
        self.n_encoded += len(image)
        return torch.tensor([_pair_score(int(i), int(t[1:])) for i, t in zip(image[:, 0, 0, 0], text)])


@pytest.mark.parametrize("embeds", [True, False])
def test_score_retrieval(embeds):
    loader = [_ret_batch([3, 0, 6]), _ret_batch([1, 5, 2]), _ret_batch([4, 3])]  # 3 repeated (padding)
    model = FakeScorer(embeds)
    metrics, records = score_retrieval_detailed(model, loader, device="cpu", batch_size=4)
    assert metrics == pytest.approx(_expected_retrieval(), abs=1e-12)
    assert [(r["split_idx"], r["size"]) for r in records] == [(0, 3), (1, 4)]
    assert records[0]["sample_ids"] == ["s0", "s2", "s4"]
    pairs = 3 * 3 + 4 * 4
    assert model.n_score_calls == -(-pairs // 4)
    assert model.n_encoded == (8 if embeds else pairs)  # one per loaded image, or one per pair
    assert score_retrieval(FakeScorer(embeds), loader, device="cpu") == metrics


# ---------------------------------------------------------------- two ranks (gloo)
def _two_rank_worker(rank, port, out_dir):
    import engine.tasks.captioning as cap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # No JVM here: the gather / de-dup / broadcast path is under test, not the scorers.
        cap.caption_metrics = lambda preds, refs, spice=False: {"n": len(preds), "ids": sorted(preds)}
        shards = {0: [["vcr/12#0", "a"], ["m3", "zz_last"]], 1: [["vg-7", "a"]]}  # 'a' on both; uneven
        model = FakeCaptioner()
        records, metrics = evaluate_captioning(model, [_caption_batch(b) for b in shards[rank]],
                                               device="cpu", synced_gpus=True)
        ret_shards = {0: [[0, 2, 4], [6]], 1: [[1, 3, 5], [0]]}
        scorer = FakeScorer(embeds=True)
        ret = score_retrieval(scorer, [_ret_batch(b) for b in ret_shards[rank]], device="cpu", batch_size=2)
        torch.save({"records": records, "metrics": metrics, "gen_calls": len(model.calls),
                    "ret": ret, "score_calls": scorer.n_score_calls}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_gather_dedup_and_lockstep(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules instead of importing torch again
    torch.multiprocessing.start_processes(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2,
                                          start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1))
    assert [r["sample_id"] for r in r0["records"]] == ORDER and r0["records"] == r1["records"]
    assert r0["metrics"] == r1["metrics"] == {"n": 5, "ids": ORDER}
    assert r0["gen_calls"] == r1["gen_calls"] == 2  # rank 1 padded with a throw-away generate call
    assert r0["ret"] == r1["ret"] == pytest.approx(_expected_retrieval(), abs=1e-12)
    assert r0["score_calls"] == r1["score_calls"]  # lockstep, as ZeRO-3 needs
