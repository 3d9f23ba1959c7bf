"""bench/: the data-pipeline benchmark runs in smoke mode and edits only its own docs section (no timing asserted)."""
import json
import os
import sys

from helpers import ROOT, load_script


def test_data_pipeline_smoke_writes_its_section(tmp_path):
    bench = load_script("bench", "data_pipeline")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Training throughput\n\nkeep me\n\n## Data pipeline\n\nold\n\n## Memory\n\nme too\n")
    assert bench.main(["--smoke", "--sizes", "64", "--workdir", str(tmp_path / "work"), "--write", str(doc)]) == 0
    text = doc.read_text()
    assert "keep me" in text and "me too" in text and "\nold\n" not in text
    assert text.count("## Data pipeline") == 1 and text.index("## Training") < text.index("## Data pipeline")
    rows = [line for line in text.splitlines() if line.startswith("| blip")]
    assert [r.split("|")[1].strip() for r in rows] == ["blip_image_train", "blip2_image_train", "blip_image_eval"]
    assert all(r.rstrip(" |").endswith("x") for r in rows)
    assert "python bench/data_pipeline.py --smoke" in text
    assert len(os.listdir(tmp_path / "work" / "jpegs")) == 4


def test_annotation_memory_smoke_measures_both_starts_and_writes_its_section(tmp_path):
    bench = load_script("bench", "annotation_memory")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data pipeline\n\nkeep me\n")
    out = tmp_path / "after.json"
    assert bench.main(["--smoke", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for start in ("cold", "cached", "collected"):
        r = result[start]
        assert r["records"] == 3000 and r["cache"] and len(r["pss_mb"]) == 3  # the rank and 2 workers
        assert r["pss_sum_mb"] > 0 and r["one_copy_mb"] > 0
    assert result["check"]["check_ok"]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from report import write_section
    finally:
        sys.path.pop(0)
    write_section(str(doc), bench.SECTION, bench.section(result, result, 3000, "python bench/annotation_memory.py --smoke"))
    text = doc.read_text()
    assert "keep me" in text and text.count("## Annotation files at full size") == 1
    assert "| before, later start |" in text and "| after, later start: map the cache |" in text
    assert "python bench/annotation_memory.py --smoke" in text


def test_gpu_diagnosis_sweep_logic_on_the_cpu(tmp_path):
    """bench/gpu_throughput.py --diagnose --tiny: the GPU script's sweep, phases and counts, on the tiny model."""
    import subprocess

    out = tmp_path / "diag.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_throughput.py"), "--diagnose", "--tiny",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    assert info["auto_batch"] == 16 and set(info["describe"]) == {"vision", "qformer", "llm"}
    rows = info["rows"]
    assert [(r["batch"], r["checkpoint_llm"]) for r in rows] == [(2, False), (16, False), (2, True), (16, True)]
    for r in rows:
        assert set(r["phases_ms"]) >= {"data_wait", "inputs", "vision", "qformer", "llm", "backward", "step"}
        assert all(v > 0 for v in r["phases_ms"].values()) and r["samples_per_s"] > 0 and r["kernels_per_step"] > 100
    # recomputing the LLM adds its forward's ops to the step
    assert rows[2]["kernels_per_step"] > rows[0]["kernels_per_step"]
    assert "| auto (16) |" in proc.stdout


def test_loader_speed_smoke_measures_the_trainers_loader(tmp_path):
    """bench/loader_speed.py --smoke: the trainer's own loader over generated Sherlock data delivers whole collated
    batches, and the table's workers-per-GPU column is the stated arithmetic on the measured per-worker rate."""
    import math

    bench = load_script("bench", "loader_speed")
    assert (bench.workers_needed(350, 100), bench.workers_needed(400, 100), bench.workers_needed(401, 100)) == (5, 5, 6)
    assert bench.workers_needed(1, 1000) == 1
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data pipeline\n\nkeep me\n\n## Training loader against the GPU\n\nold\n")
    out = tmp_path / "loader.json"
    assert bench.main(["--smoke", "--workdir", str(tmp_path / "work"), "--gpu-samples-per-s", "100",
                       "--gpu-samples-per-s", "2000", "--json", str(out), "--write", str(doc)]) == 0
    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert [r["workers"] for r in rows] == [1, 2]  # one worker (the per-worker rate), then --smoke's 2
    for r in rows:
        assert r["samples"] == r["batches"] * r["batch"] == 4 * 8  # the micro batch of recipes/sherlock_opt2.7b.yaml
        fields = r["batch_fields"]
        assert fields["image"] == [[8, 3, 364, 364], "uint8"]  # the model's 364 px, uint8 out of the workers
        assert set(fields["inputs"]) == {"input_ids", "labels"} and fields["inputs"]["labels"][0] == 8
        assert fields["masked_labels"] > 8 * 32  # OPT's 32 query positions and the prompt are masked in every row
        assert r["worker_cpu_s"] > 0 and r["samples_per_s"] > 0
        assert r["per_worker"] == rows[0]["samples_per_worker_cpu_s"]
        want = {"100.0": math.ceil(100 * 1.25 / r["per_worker"]), "2000.0": math.ceil(2000 * 1.25 / r["per_worker"])}
        assert r["needed"] == {k: max(1, v) for k, v in want.items()}
    text = doc.read_text()
    assert "keep me" in text and "\nold\n" not in text and text.count("## Training loader against the GPU") == 1
    table = [line for line in text.splitlines() if line.startswith("| recipes/sherlock_opt2.7b.yaml |")]
    assert [line.split("|")[-3:-1] for line in table] == [
        [f" {r['needed']['100.0']} ", f" {r['needed']['2000.0']} "] for r in rows]
    assert "python bench/loader_speed.py --smoke" in text


def test_startup_report_line_and_peak_reading():
    bench = load_script("bench", "startup")
    line = ("2026-12-01 17:58:20 INFO start-up took 52.0 s: config 1.0 s, imports and set-up 2.7 s, distributed init "
            "0.1 s, model build/load 41.0 s, base fingerprint 5.7 s, datasets 0.1 s, DeepSpeed init 2.3 s\n")
    got = bench.parse_startup(line)
    assert got["total_s"] == 52.0 and got["stages"]["model build/load"] == 41.0 and len(got["stages"]) == 7
    assert bench.parse_startup("step 1 epoch 0 loss 3.2") is None
    big = b"\1" * (256 * 2 ** 20)  # written, so resident: the peak resident set holds it
    assert bench.peak_rss_mib(os.getpid()) > 256
    del big
    assert bench.rank_pids(os.getpid()) == []  # pytest is no engine/train.py and has started none


def test_startup_smoke_launches_the_engine_and_writes_its_section(tmp_path):
    """bench/startup.py --smoke: engine/train.py on the tiny model, stopped at its start-up report."""
    bench = load_script("bench", "startup")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data pipeline\n\nkeep me\n")
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--json", str(out), "--label", "smoke", "--write", str(doc)]) == 0
    r = json.loads(out.read_text())
    assert {"config", "distributed init", "model build/load", "base fingerprint", "datasets",
            "DeepSpeed init"} <= set(r["stages"])
    assert r["launch_to_first_step_s"] >= r["startup_total_s"] > 0
    assert abs(sum(r["stages"].values()) - r["startup_total_s"]) < 0.1 * len(r["stages"])
    (peak,) = r["host_peak_mib_per_rank"]
    assert 300 < peak < 8000  # one process with torch, DeepSpeed and the tiny model
    text = doc.read_text()
    assert "keep me" in text and text.count("## Start-up") == 1 and "| smoke |" in text
    assert "python bench/startup.py --smoke" in text
