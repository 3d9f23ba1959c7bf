"""bench/: the training-throughput, evaluation-speed and GPU scripts run (smoke mode, no timing asserted);
the FLOP count behind MFU matches what torch counts on real models."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # bench/train_throughput.py, bench/flops.py


def run_script(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 2):
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def test_train_throughput_smoke_writes_rows_and_only_its_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data pipeline\n\nkeep me\n\n## Training throughput\n\nold\n\n## GPU memory\n\nme too\n")
    out = tmp_path / "result.json"
    proc = run_script("bench/train_throughput.py", "--smoke", "--threads", "1", "--json", str(out),
                      "--workdir", str(tmp_path / "work"), "--write", str(doc))
    assert proc.returncode == 0
    (res,) = json.loads(out.read_text())["results"]
    assert set(res["rows"]) == {"engine", "bare", "trainer"}
    for row in res["rows"].values():
        assert row["step_ms"] > 0 and row["samples_per_s"] > 0 and row["peak_mem_gb"] > 0 and row["tflops"] > 0
    assert res["engine_vs_bare_step_time"] > 0 and res["engine_vs_trainer_throughput"] > 0
    assert res["flops_per_step"] > 0 and res["trainable"] == res["params"] > 0
    text = doc.read_text()
    assert "keep me" in text and "me too" in text and "\nold\n" not in text
    assert text.count("## Training throughput") == 1
    assert text.index("## Data pipeline") < text.index("## Training throughput") < text.index("## GPU memory")
    rows = [line for line in text.splitlines() if "DeepSpeed" in line and line.startswith("|")]
    assert re.search(r"engine/bare step time \d+\.\d\dx \|$", rows[0])
    assert re.search(r"engine/Trainer throughput \d+\.\d\dx \|$", rows[1])
    assert "python bench/train_throughput.py --smoke" in text
    # the engine's own loop ran: it logged step 1 (later steps are written every log_freq steps)
    steps = [json.loads(line) for line in open(tmp_path / "work" / "tiny-engine" / "steps.jsonl")]
    assert steps[0]["step"] == 1 and steps[0]["loss"] > 0


def test_eval_speed_smoke(tmp_path):
    out = tmp_path / "result.json"
    doc = tmp_path / "benchmarks.md"
    proc = run_script("bench/eval_speed.py", "--smoke", "--json", str(out), "--write", str(doc))
    assert proc.returncode == 0
    res = json.loads(out.read_text())
    assert [g["num_beams"] for g in res["generation"]] == [1, 3]
    assert all(g["samples_per_s"] > 0 and g["tokens_per_s"] > 0 for g in res["generation"])
    assert res["metrics"]["seconds"] > 0 and res["metrics"]["predictions"] == 50
    assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(res["metrics"]["metrics"])
    text = doc.read_text()
    assert text.count("## Evaluation speed") == 1 and "samples/s" in text and " s |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_throughput_says_it_needs_cuda():
    proc = run_script("bench/gpu_throughput.py", timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "nothing was measured" in proc.stderr


def _batch(model, data, n):
    image = torch.stack([data[i]["image"] for i in range(n)])
    return image, [data[i]["prompt"] for i in range(n)], [data[i]["text_output"] for i in range(n)]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_flop_formula_matches_torch_flop_counter(name, tmp_path):
    # tiny trains every part (backward through the ViT too); small is the BLIP-2 recipe: frozen ViT and OPT.
    import flops
    import train_throughput as tt

    from engine.build import build_model
    from engine.models.zoo import ZOO_OPT, ZooEntry

    bench = tt.benches(smoke=True)[name]
    if bench.zoo:  # the benchmark's own zoo entry, only for this test (other tests list the zoo)
        ZOO_OPT[bench.zoo["name"]] = ZooEntry(None, dict(bench.zoo["defaults"]), dict(bench.zoo["config"]))
    try:
        recipe = tt._recipe(bench, str(tmp_path))
        model = build_model(recipe)
    finally:
        if bench.zoo:
            del ZOO_OPT[bench.zoo["name"]]
    data = tt.SyntheticCaptions(4, bench.image_size, recipe.model.prompt)  # texts of different lengths
    image, prompt, text = _batch(model, data, 2)
    seq_len = model.build_inputs(prompt, text)["input_ids"].shape[1]
    vit, qformer, llm = flops.trained_parts(model.hf)
    assert (vit, qformer, llm) == ((True, True, True) if name == "tiny" else (False, True, False))
    counted = flops.blip2_opt_step_flops(model.hf.config, 2, seq_len, train_vit=vit, train_qformer=qformer,
                                         train_llm=llm)
    measured = flops.measured_flops(model, image, prompt, text)
    assert counted["total"] == pytest.approx(measured, rel=1e-6)
    assert counted["backward"] > 0 and counted["forward"] > 0
