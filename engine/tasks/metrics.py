"""Captioning metrics: pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr (SPICE when it can run).

Scores are exactly what pycocoevalcap gives for the same captions: the same PTB
tokenizer, the same scorers, called the way its ``COCOEvalCap`` calls them. What
differs is the bookkeeping around them:

* ids are any strings (Sherlock has many samples per image, so the key is the
  sample id, not a COCO image id);
* bad inputs fail with the offending ids named, instead of a bare ``assert``;
* METEOR's Java process is always closed, even when scoring fails;
* SPICE, which needs Stanford CoreNLP jars that pycocoevalcap downloads on first
  use, is skipped with one log line when it cannot run.
"""
from __future__ import annotations

import difflib
import logging
import os
import shutil
import threading
from typing import Collection, Dict, List, Mapping

logger = logging.getLogger(__name__)

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
CAPTION_METRIC_KEYS = BLEU_KEYS + ("METEOR", "ROUGE_L", "CIDEr")
RETRIEVAL_METRIC_KEYS = ("im2txt_mean_rank", "txt2im_mean_rank", "p_at_1")

# SPICE parses with Stanford CoreNLP 3.6.0; pycocoevalcap fetches these two jars
# from the internet the first time Spice() is constructed.
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def _id_list(ids, limit: int = 10) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" ... and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_inputs(predictions: Mapping, references: Mapping) -> None:
    if not predictions:
        raise ValueError("caption_metrics: no predictions to score (the predictions dict is empty)")
    no_refs = [i for i in predictions if not references.get(i)]
    if no_refs:
        raise ValueError(
            f"caption_metrics: {len(no_refs)} prediction id(s) have no references: {_id_list(no_refs)}. "
            f"Every predicted sample needs at least one reference caption."
        )
    bad_pred = [i for i, p in predictions.items() if not isinstance(p, str)]
    if bad_pred:
        raise TypeError(f"caption_metrics: predictions must be strings; not for id(s) {_id_list(bad_pred)}")
    bad_refs = [i for i in predictions
                if isinstance(references[i], str) or not all(isinstance(r, str) for r in references[i])]
    if bad_refs:
        raise TypeError(
            f"caption_metrics: references must be lists of strings; not for id(s) {_id_list(bad_refs)}"
        )
    unused = len(set(references) - set(predictions))
    if unused:
        # Scoring a subset is legitimate (e.g. a capped validation run), but after a
        # multi-rank gather it usually means predictions went missing: say so.
        logger.warning("caption_metrics: %d reference id(s) have no prediction; scoring the %d predicted ones",
                       unused, len(predictions))


def _one_line(text: str) -> str:
    # The PTB tokenizer is run with -preserveLines and its output is matched back to
    # ids line by line; pycocoevalcap only replaces '\n', so a '\r' or U+2028 inside a
    # caption would silently shift every later caption onto the wrong id.
    return " ".join(text.splitlines())


def _close_meteor(meteor) -> None:
    """Stop METEOR's Java process without waiting on its lock.

    pycocoevalcap's ``Meteor.compute_score`` takes a lock and does not release it
    if reading Java's answer fails; its ``__del__`` then blocks forever on that lock
    at garbage collection. We end the process ourselves and leave a fresh lock so
    ``__del__`` finds nothing to wait for.
    """
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    meteor.lock = threading.Lock()


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when it can."""
    if shutil.which("java") is None:
        return "java is not on PATH"
    try:
        import pycocoevalcap.spice.spice as spice_mod  # here: SPICE is optional (it needs Java)
    except ImportError as e:  # pragma: no cover - pycocoevalcap is a dependency
        return f"pycocoevalcap.spice cannot be imported ({e})"
    lib = os.path.join(os.path.dirname(os.path.abspath(spice_mod.__file__)), "lib")
    missing = [j for j in _SPICE_CORENLP_JARS if not os.path.exists(os.path.join(lib, j))]
    if missing:
        return (f"Stanford CoreNLP jars {', '.join(missing)} are not in {lib} (pycocoevalcap downloads them on "
                f"first use, which needs internet; run `python -m pycocoevalcap.spice.get_stanford_models` once "
                f"on a machine with network access, or copy the jars there)")
    return None


def caption_metrics(predictions: Dict[str, str], references: Dict[str, List[str]],
                    spice: bool = False) -> Dict[str, float]:
    """Score ``predictions`` (id -> caption) against ``references`` (id -> captions).

    Returns ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`` (plus ``"SPICE"``
    when asked for and runnable) as pycocoevalcap computes them, on a 0-1 scale
    (CIDEr can exceed 1). ``references`` may hold ids that were not predicted;
    those are left out of the corpus (and a warning is logged).
    Needs Java on PATH (the PTB tokenizer and METEOR are Java programs).
    """
    _check_inputs(predictions, references)
    if shutil.which("java") is None:
        raise RuntimeError("caption_metrics needs Java on PATH: pycocoevalcap's PTB tokenizer and METEOR are "
                           "Java programs (e.g. apt-get install openjdk-17-jre-headless)")
    # pycocoevalcap here, not at the top: its scorers start Java tools and are needed only when scoring.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(predictions)
    gts = {i: [{"caption": _one_line(r)} for r in references[i]] for i in ids}
    res = {i: [{"caption": _one_line(predictions[i])}] for i in ids}

    # Start METEOR's JVM first: it spends seconds loading its paraphrase table, which
    # then overlaps with tokenization and the pure-Python scorers.
    meteor = Meteor()
    try:
        tokenizer = PTBTokenizer()
        gts_tok = tokenizer.tokenize(gts)
        res_tok = tokenizer.tokenize(res)
        for name, before, after in (("references", gts, gts_tok), ("predictions", res, res_tok)):
            bad = [i for i in ids if len(after.get(i, ())) != len(before[i])]
            if bad:
                raise RuntimeError(f"caption_metrics: the PTB tokenizer lost {name} of id(s) {_id_list(bad)}")

        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
        rouge, _ = Rouge().compute_score(gts_tok, res_tok)
        cider, _ = Cider().compute_score(gts_tok, res_tok)
        try:
            meteor_score, _ = meteor.compute_score(gts_tok, res_tok)
        except (ValueError, BrokenPipeError) as e:
            proc = meteor.meteor_p
            if proc.poll() is None:
                proc.kill()
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"METEOR's Java process failed ({e}); its stderr ends with:\n{err}") from e
    finally:
        _close_meteor(meteor)

    out = {k: float(v) for k, v in zip(BLEU_KEYS, bleu)}
    out["METEOR"] = float(meteor_score)
    out["ROUGE_L"] = float(rouge)
    out["CIDEr"] = float(cider)

    if not spice:
        logger.info("SPICE skipped: not requested (spice=False)")
        return out
    reason = spice_unavailable_reason()
    if reason is not None:
        logger.warning("SPICE skipped: %s", reason)
        return out
    from pycocoevalcap.spice.spice import Spice  # here: SPICE is optional (it needs Java)
    try:
        out["SPICE"] = float(Spice().compute_score(gts_tok, res_tok)[0])
    except Exception as e:  # an optional metric must not throw away a finished evaluation
        logger.warning("SPICE skipped: it failed to run (%s: %s); SPICE 1.0 is known to need Java 8",
                       type(e).__name__, e)
    return out


def _terms(name: str) -> List[str]:
    terms = [t.strip() for t in str(name).split("+")]
    if not all(terms):
        raise ValueError(f"metric name {name!r} is malformed: expected KEY or KEY+KEY+..., e.g. 'CIDEr+Bleu_4'")
    return terms


def check_metric_name(name: str, valid: Collection[str]) -> None:
    """Raise ValueError when ``name`` (a key or a sum of keys) uses keys outside ``valid``."""
    valid = list(valid)
    unknown = [t for t in _terms(name) if t not in valid]
    if unknown:
        lower = {v.lower(): v for v in valid}  # 'Cider' should point to 'CIDEr'
        hints = []
        for t in unknown:
            near = difflib.get_close_matches(t.lower(), list(lower), n=1, cutoff=0.5)
            hints.append(f"{t!r}" + (f" (did you mean {lower[near[0]]!r}?)" if near else ""))
        raise ValueError(f"metric {name!r}: unknown key(s) {', '.join(hints)}. "
                         f"Valid keys: {', '.join(valid)}; combine keys with '+', e.g. 'CIDEr+Bleu_4'")


def aggregate_metric(metrics: Mapping[str, float], name: str,
                     lower_is_better: Collection[str] = ()) -> float:
    """One number from ``metrics``: a single key (``"CIDEr"``) or a sum (``"CIDEr+Bleu_4"``).

    LAVIS picks its best captioning checkpoint by CIDEr + Bleu_4. Keys listed in
    ``lower_is_better`` (e.g. mean ranks) enter the sum negated, so the result is
    always higher-is-better.
    """
    terms = _terms(name)
    check_metric_name(name, list(metrics))
    return float(sum(-metrics[t] if t in lower_is_better else metrics[t] for t in terms))
