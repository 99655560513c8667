"""Stop at the peak: the rule on metric sequences, and the trainer ending a run at its peak through the node,
across a cancel and resume, and as a job of two CPU processes, with the monitor's metrics driven by the test
(checkpoints are still sampled, at 1 step; only the numbers judged are the test's)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from klein_lora_studio.tests.helpers import run_trainer
from klein_lora_studio.trainer.evaluation import early_stop
from klein_lora_studio.trainer.evaluation import metrics as mt

LOW_FLEX = mt.FLEX_MIN - 0.1  # collapsed, by the recommendation's own threshold
HIGH_LEAK = mt.LEAK_MAX + 0.1


def m(step: int, strength: float | None, leak: float = 0.1, flex: float = 0.9) -> mt.CheckpointMetrics:
    return mt.CheckpointMetrics(f"step {step}", step, f"/r/run_step{step:05d}.safetensors", strength, leak, flex)


# strength rises to its peak at step 3, then flexibility collapses (step 4) and stays collapsed (step 5)
PEAKED = [m(1, 0.2), m(2, 0.4), m(3, 0.6), m(4, 0.55, flex=LOW_FLEX), m(5, 0.5, flex=0.3)]


def test_stops_after_patience_checkpoints_past_the_peak_and_keeps_the_recommended_one():
    assert early_stop.decide(PEAKED[:4], 2) is None  # one checkpoint past the peak: not yet
    stop = early_stop.decide(PEAKED, 2)
    pick, why = mt.recommend([dataclasses.replace(x, flags=[]) for x in PEAKED])
    assert (stop.step, stop.keep_step, stop.keep_label) == (5, 3, "step 3") and pick.step == 3
    assert "2 consecutive checkpoints (step 4, step 5)" in stop.reason and "peaked at step 3 (0.60)" in stop.reason
    assert why in stop.reason and "flexibility collapsed (0.30" in stop.reason
    assert early_stop.decide(PEAKED[:4], 1).step == 4 and early_stop.decide(PEAKED, 3) is None
    assert early_stop.decide(PEAKED, 0) is None  # off
    assert early_stop.decide(list(reversed(PEAKED)), 2) == stop  # judged in step order, whatever the list order
    assert all(not x.flags for x in PEAKED)  # pure: the history's own metrics are not flagged in place


def test_a_flagged_checkpoint_whose_strength_still_rises_is_not_past_the_peak():
    rising = [m(1, 0.2), m(2, 0.4, flex=LOW_FLEX), m(3, 0.5, flex=LOW_FLEX)]
    assert early_stop.past_peak(rising) == [False, False, False] and early_stop.decide(rising, 1) is None
    # a first checkpoint that moved away from the dataset (strength < 0, the base model's is 0) is no rise
    assert early_stop.past_peak([m(1, -0.1, leak=HIGH_LEAK)]) == [True]


def test_the_token_strength_decides_the_rise_where_it_is_measured():
    """A flagged checkpoint whose channel statistic fell but whose token strength still rises is not past the peak
    (metrics.strength_of: the strength recommend ranks by)."""
    flagged = [dataclasses.replace(m(1, 0.5), token_strength=0.02), dataclasses.replace(
        m(2, 0.1, flex=LOW_FLEX), token_strength=0.04)]
    assert early_stop.past_peak(flagged) == [False, False]
    assert early_stop.past_peak([flagged[0], dataclasses.replace(flagged[1], token_strength=0.01)]) == [False, True]


def test_leakage_counts_like_collapse_and_an_unflagged_checkpoint_resets_the_count():
    leaky = [m(1, 0.5), m(2, 0.45, leak=HIGH_LEAK), m(3, 0.4), m(4, 0.4, leak=HIGH_LEAK)]
    assert early_stop.past_peak(leaky) == [False, True, False, True]
    assert early_stop.decide(leaky, 2) is None and early_stop.decide(leaky, 1).step == 4
    assert early_stop.decide([*leaky, m(5, 0.3, leak=HIGH_LEAK)], 2).step == 5


def test_the_thresholds_are_the_recommendations():
    """Just inside and just outside metrics.FLEX_MIN / LEAK_MAX: the rule moves with them, it has none of its own."""
    eps = 1e-3
    assert early_stop.past_peak([m(1, 0.5), m(2, 0.4, flex=mt.FLEX_MIN - eps)]) == [False, True]
    assert early_stop.past_peak([m(1, 0.5), m(2, 0.4, flex=mt.FLEX_MIN + eps)]) == [False, False]
    assert early_stop.past_peak([m(1, 0.5), m(2, 0.4, leak=mt.LEAK_MAX + eps)]) == [False, True]
    assert early_stop.past_peak([m(1, 0.5), m(2, 0.4, leak=mt.LEAK_MAX - eps)]) == [False, False]


def test_without_strength_the_flags_alone_decide():
    unmeasured = [m(1, None), m(2, None, flex=LOW_FLEX), m(3, None, flex=LOW_FLEX)]
    assert early_stop.past_peak(unmeasured) == [False, True, True]
    assert early_stop.decide(unmeasured, 2).keep_step == 1


def test_a_decision_round_trips_through_the_job_protocol():
    from klein_lora_studio.trainer.jobs import events

    stop = early_stop.decide(PEAKED, 2)
    line = events.verdict_line(5, stop)

    class Stream:  # the child's stdin: other output, an older verdict, then this one
        lines = ["ComfyUI says hello\n", events.verdict_line(4, None), line]

        def readline(self):
            return self.lines.pop(0) if self.lines else ""

    assert early_stop.StopDecision.from_dict(events.read_verdict(Stream(), 5)) == stop
    assert events.read_verdict(Stream(), 6) is None  # the parent gone: go on


# ------------------------------------------------------------------ the trainer, with driven metrics

SCRIPT = {1: (0.3, 0.1, 0.9), 2: (0.5, 0.1, 0.9), 3: (0.6, 0.1, 0.8), 4: (0.55, 0.1, LOW_FLEX),
          5: (0.5, 0.2, 0.3), 6: (0.45, 0.3, 0.2)}  # peak at 3; past it from 4: patience 2 stops after 5
RUN = dict(rank=2, alpha=2.0, learning_rate=2e-3, steps=6, save_every=1, seed=1, save_dtype="fp32", sample_steps=1)


@pytest.fixture(scope="module")
def driven():
    """The monitor judges every sampled checkpoint by SCRIPT (`judged`: the steps it judged, `hooks`: a call at a
    step's judgement); `sent`: the node's websocket events. One torch thread (two spin on a shared 2-core box)."""
    from klein_lora_studio.nodes import lora_trainer
    from klein_lora_studio.trainer.evaluation.monitor import TrainingMonitor

    judged, sent, hooks = [], [], {}

    def scripted(self, column):
        judged.append(column.step)
        if (hook := hooks.pop(column.step, None)) is not None:
            hook()
        return mt.CheckpointMetrics(column.label, column.step, str(column.path), *SCRIPT[column.step])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainingMonitor, "checkpoint_metrics", scripted)
        mp.setattr(lora_trainer, "_send", lambda event, data: sent.append((event, data)))
        yield dict(judged=judged, sent=sent, hooks=hooks)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(encoded):
    return encoded("early_stop", n=2)


@pytest.fixture(scope="module")
def whole(setup, tiny, driven):
    """The run stopped at its peak, uninterrupted."""
    driven["judged"].clear()
    out = run_trainer(setup, **RUN, clip=tiny.clip, vae=tiny.vae, output_name="es_run", early_stop_patience=2)
    return dict(out=out, judged=list(driven["judged"]), sent=list(driven["sent"]))


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.comfy
def test_the_trainer_stops_at_the_peak_and_returns_the_recommended_lora(whole):
    out = whole["out"]
    model, lora, lora_path, loss, checkpoints, evaluation = out.args
    assert whole["judged"] == [1, 2, 3, 4, 5] and len(loss["loss"]) == 5  # ended after step 5's checkpoint
    folder = Path(lora_path).parent / "es_run_checkpoints"
    kept = folder / "es_run_step00003.safetensors"
    assert _same(lora, _tensors(kept)) and _same(_tensors(lora_path), _tensors(kept))
    assert not _same(lora, _tensors(folder / "es_run_step00005.safetensors"))
    assert [Path(p).name for p in checkpoints.splitlines()][-2:] == ["es_run_step00005.safetensors", "es_run.safetensors"]
    assert "Stopped early: stopped at the peak after step 5" in evaluation and "The LoRA is step 3's" in evaluation
    from safetensors import safe_open

    with safe_open(lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == "3" and meta["early_stop_reason"].startswith("stopped at the peak after step 5")
    assert json.loads(meta["early_stop"]) == {"stopped_at_step": 5, "kept_step": 3, "kept": kept.name,
                                              "planned_steps": 6, "patience": 2}
    [event] = [d for e, d in whole["sent"] if e == "klein_lora.stopped"]
    assert (event["step"], event["keep_step"]) == (5, 3) and "peaked at step 3" in event["reason"]
    assert out.ui["stopped"][0]["keep_step"] == 3
    report = json.loads((Path(lora_path).parent / "es_run_eval.json").read_text())
    assert report["stopped"]["step"] == 5 and report["recommended"]["step"] == 3
    assert (folder / "es_run_step00005.trainstate").is_file()  # resume_from 'latest' goes on from the stop


@pytest.mark.comfy
def test_off_trains_every_step_as_before(setup, tiny, driven):
    """patience 0 with the same peaked metrics: all 6 steps, the final LoRA is the last step's, no history file;
    the LoRA equals a run that samples nothing (no clip)."""
    driven["judged"].clear()
    sent = len(driven["sent"])
    out = run_trainer(setup, **RUN, clip=tiny.clip, vae=tiny.vae, output_name="es_off")
    plain = run_trainer(setup, **RUN, output_name="es_plain")
    _, lora, lora_path, loss, _, evaluation = out.args
    assert driven["judged"] == [1, 2, 3, 4, 5, 6] and len(loss["loss"]) == 6
    assert "Stopped early" not in evaluation and "stopped" not in out.ui
    assert _same(lora, plain.args[1]) and _same(_tensors(lora_path), _tensors(plain.args[2]))
    assert not list(Path(lora_path).parent.glob("es_off_checkpoints/*_monitor.json"))
    assert not [e for e, _ in driven["sent"][sent:] if e == "klein_lora.stopped"]
    with pytest.raises(ValueError, match="early_stop_patience 2 stops the run by the checkpoint samples"):
        run_trainer(setup, **RUN, output_name="es_blind", early_stop_patience=2)  # no clip/vae: nothing to judge


@pytest.mark.comfy
def test_a_cancelled_and_resumed_run_keeps_its_history_and_stops_where_the_whole_run_does(setup, tiny, driven, whole):
    """Cancel while step 3 is judged, resume 'latest': the history (steps 1-3) is read back, so step 4 is no new
    high and the run stops after 5 keeping 3, as uninterrupted. Without the history step 4 (0.55) would be a rise
    from 0 and the run would go on to 6."""
    import comfy.model_management as mm

    driven["judged"].clear()
    driven["hooks"][3] = lambda: mm.interrupt_current_processing(True)  # Cancel pressed while step 3 is judged
    with pytest.raises(mm.InterruptProcessingException):
        run_trainer(setup, **RUN, clip=tiny.clip, vae=tiny.vae, output_name="es_cut", early_stop_patience=2)
    resumed = run_trainer(setup, **RUN, clip=tiny.clip, vae=tiny.vae, output_name="es_cut", early_stop_patience=2,
                          resume_from="latest")
    assert driven["judged"] == [1, 2, 3, 4, 5]
    assert len(resumed.args[3]["loss"]) == 5
    mine, theirs = resumed.ui["stopped"][0], whole["out"].ui["stopped"][0]
    assert mine == theirs  # the same decision, reason and all (labels are steps, not file names)
    assert _same(resumed.args[1], whole["out"].args[1])  # the kept step 3 equals the whole run's
    assert "step 1: strength 0.30" in resumed.args[5]  # the evaluation covers the steps before the resume too


@pytest.mark.comfy
@pytest.mark.slow
def test_a_job_on_two_processes_stops_at_the_same_checkpoint(setup, tiny, driven):
    """gpus='cpu,cpu': the checkpoints are judged here, the child waits for each verdict, so both ranks end after
    step 5 and the outputs are checkpoint 3's, reported as an in-process run reports them."""
    driven["judged"].clear()
    sent = len(driven["sent"])
    out = run_trainer(setup, **{**RUN, "batch_size": 2}, clip=tiny.clip, vae=tiny.vae, output_name="es_job",
                      early_stop_patience=2, gpus="cpu,cpu")
    model, lora, lora_path, loss, checkpoints, evaluation = out.args
    assert driven["judged"] == [1, 2, 3, 4, 5] and len(loss["loss"]) == 5
    folder = Path(lora_path).parent / "es_job_checkpoints"
    kept = folder / "es_job_step00003.safetensors"
    assert _same(lora, _tensors(kept)) and _same(_tensors(lora_path), _tensors(kept))
    assert not (folder / "es_job_step00006.safetensors").exists()
    assert "Stopped early: stopped at the peak after step 5" in evaluation
    from safetensors import safe_open

    with safe_open(lora_path, "pt") as f:
        assert json.loads(f.metadata()["early_stop"])["kept_step"] == 3
    [event] = [d for e, d in driven["sent"][sent:] if e == "klein_lora.stopped"]
    assert (event["step"], event["keep_step"]) == (5, 3)
