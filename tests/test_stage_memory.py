"""What a stage holds: eval and bench load each artifact once the last one is freed (on a GPU, placement reads the
free memory then), and one peak meter measures a stage whatever is measured inside it."""
from __future__ import annotations

import json
import weakref

import torch

from pipeline import memory, models
from pipeline.artifacts import read_manifest
from pipeline.stages import bench, eval as eval_stage


def test_eval_and_bench_load_each_artifact_after_the_last_one_is_freed(copy_of, monkeypatch):
    exp, rerun = copy_of
    loaded_before, still_alive = [], []

    def load_placed(stage, name, *args):
        still_alive.extend(f"{stage}: {earlier} as {name} loads" for earlier, ref in loaded_before if ref())
        loaded = models.load_placed(stage, name, *args)
        if not isinstance(loaded, str):
            loaded_before.append((name, weakref.ref(loaded[0])))
        return loaded
    for stage in (eval_stage, bench):
        monkeypatch.setattr(stage, "load_placed", load_placed)
    three = "[merged,gptq,nf4]"
    rerun("stage=eval", f"eval.artifacts={three}", "eval.lm_eval.tasks=[]")
    rerun("stage=bench", f"bench.artifacts={three}", "bench.compile=none")
    assert [name for name, _ in loaded_before] == ["merged", "gptq", "nf4"] * 2 and not still_alive, still_alive

    # The stage's peak covers every generation measured inside it (one meter, nested).
    runs = [r for a in json.loads((exp / "bench" / "bench.json").read_text())["artifacts"].values()
            for r in a.get("runs", [])]
    stage_peak = read_manifest(exp / "bench")["peak_memory"]
    assert max(r["peak_memory_bytes"] for r in runs) <= stage_peak.get("device_bytes", stage_peak["host_rss_bytes"])


def test_a_peak_measured_inside_a_stage_leaves_the_stage_peak_whole():
    """bench measures each generation's peak inside the stage's meter: resetting the peaks for an inner block must
    not lose what the stage held before it, nor stop the stage's meter seeing what comes after it."""
    megabytes = 256

    def hold_and_free():
        held = torch.ones(megabytes * 2**20 // 4)  # touched: resident
        del held  # a large block goes back to the OS at once

    with memory.peak() as before:
        hold_and_free()
        with memory.peak() as generation:
            torch.ones(1024)
    with memory.peak() as after:
        for _ in range(3):  # inner blocks whose peaks equal the stage's: its meter stays open all the same
            with memory.peak() as generation:
                torch.ones(1024)
        hold_and_free()
    for stage in (before, after):
        assert stage["host_rss_bytes"] - generation["host_rss_bytes"] > 0.8 * megabytes * 2**20, (stage, generation)
