"""CGGR's own state across a Trainer checkpoint and resume (CPU, tiny models, a few steps).

Each checkpoint folder gets ``cggr_state.pt`` (``CGGRModel.cggr_state_dict``: the schedule's step and
the learned exit's statistics, no model parameter); ``trainer.train(resume_from_checkpoint=...)``
loads it before the first step, so the resumed run selects what the uninterrupted one does. Without
the file the exit starts cold and refits within ``exit_min_fits`` fits.
"""

from __future__ import annotations

import logging
import os

import torch
import transformers as T

import cggr_compile
from cggr_compile.integrations import CGGR_STATE_NAME
from models import tiny_model
from test_integrations import Rows, training_args

# k = 3 of 4 rows: enough tokens of weight per fit for the exit to be ready after exit_min_fits fits.
PRED = dict(strict=True, router_layers=1, min_tokens_ratio=0.75, warmup_steps=0, scoring="predicted",
            exit_min_fits=2)


class Record(T.TrainerCallback):
    """Per optimizer step, the selections of its micro-batches; at each save, the exit's state; at the
    start of training (after a resume's load), the exit's state and the schedule's step."""

    def __init__(self, trainer, cg):
        self.cg = cg
        self.selections: dict[int, list[torch.Tensor]] = {}
        self.saved: dict[int, torch.Tensor] = {}
        self.at_begin = None
        patched = trainer.get_batch_samples
        integration = trainer._cggr

        def get_batch_samples(*args, **kwargs):
            out = patched(*args, **kwargs)
            step = trainer.state.global_step + 1
            self.selections[step] = [s.selection.clone() for s in integration.pending]
            return out

        trainer.get_batch_samples = get_batch_samples
        trainer.add_callback(self)

    def state(self):
        return None if self.cg.exit.state is None else self.cg.exit.state.detach().clone()

    def on_train_begin(self, args, state, control, **kw):
        self.at_begin = (self.state(), self.cg.schedule.step)

    def on_save(self, args, state, control, **kw):
        self.saved[state.global_step] = self.state()


def run(out_dir, max_steps, resume=None, **args):
    trainer = T.Trainer(model=tiny_model("llama"), train_dataset=Rows(32),
                        args=training_args(out_dir, max_steps=max_steps, **args))
    cg = cggr_compile.enable_cggr(trainer, **PRED)
    rec = Record(trainer, cg)
    trainer.train(resume_from_checkpoint=resume)
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    return cg, rec, logs


def test_resume_restores_the_exit_and_selects_as_the_uninterrupted_run(tmp_path):
    saving = dict(save_strategy="steps", save_steps=2)
    cg_a, rec_a, logs_a = run(tmp_path / "a", 3, **saving)  # uninterrupted, a checkpoint at step 2
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(checkpoint / CGGR_STATE_NAME, weights_only=True)
    assert saved["step"] == 2
    assert torch.equal(saved["exit"]["state"], rec_a.saved[2])  # the exit's state as the step-2 save found it
    assert float(cg_a.exit.layout.scalar(saved["exit"]["state"], "fits")) == 4  # 2 steps x 2 micro-batches
    assert logs_a[3]["cggr/exit_ready"] == 1  # step 3 selects with the fitted exit

    cg_b, rec_b, logs_b = run(tmp_path / "b", 3, resume=str(checkpoint))
    state, step = rec_b.at_begin  # loaded before the first step
    assert torch.equal(state, saved["exit"]["state"]) and step == 2 == cg_b.schedule.step - 1
    assert logs_b[3]["cggr/step"] == 3
    assert all(torch.equal(x, y) for x, y in zip(rec_b.selections[3], rec_a.selections[3], strict=True))
    assert logs_b[3]["cggr/exit_ready"] == 1 and logs_b[3]["cggr/exit_fits"] == logs_a[3]["cggr/exit_fits"] == 6
    torch.testing.assert_close(cg_b.exit.state, cg_a.exit.state, rtol=1e-5, atol=1e-5)


def test_resume_without_the_state_file_starts_the_exit_cold(tmp_path, caplog):
    cg_a, _, logs_a = run(tmp_path, 2, save_strategy="steps", save_steps=2)
    assert logs_a[2]["cggr/exit_ready"] == 1  # the first run's exit was ready at step 2
    os.remove(tmp_path / "checkpoint-2" / CGGR_STATE_NAME)  # a checkpoint of a run without it
    with caplog.at_level(logging.INFO, logger="cggr_compile"):
        cg, rec, logs = run(tmp_path, 4, resume=True)
    notes = [r.getMessage() for r in caplog.records if CGGR_STATE_NAME in r.getMessage()]
    assert len(notes) == 1 and "starts cold" in notes[0]
    assert rec.at_begin[0] is None  # a cold exit (the schedule follows the resumed global_step)
    assert logs[3]["cggr/step"] == 3
    # step 3 selects uniformly; its 2 fits (exit_min_fits) make the exit ready for step 4
    assert [logs[s]["cggr/exit_ready"] for s in (3, 4)] == [0, 1]
    assert [logs[s]["cggr/exit_fits"] for s in (3, 4)] == [2, 4]
    assert cg.schedule.step == 4
