"""Training frameworks: transformers' Trainer, TRL's SFTTrainer and a plain loop (CPU, tiny models).

The accumulation tests compare the gradient of one optimizer step of two micro-batches with the
gradient of *one* batch holding the rows (or tokens) CGGR selected in them, its loss the mean over
their valid positions, computed here from scratch (SPEC.md: every selected token weighs the same).
"""

from __future__ import annotations

import copy
import functools
import random
import warnings

import pytest
import torch
import transformers as T

import cggr_compile
from cggr_compile.schedule import quantise_ratio, ratio_levels, rows_for_ratio, warmup_ratio
from models import VOCAB, tiny_model

OPTS = dict(strict=True, router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False,
            scoring="loss", selection="topk")


class Rows(torch.utils.data.Dataset):
    """Fixed-length rows: some right-padded, some with prompt tokens at -100, one with stray labels
    under its padding (a careless collator: those positions must not count)."""

    def __init__(self, n: int, t: int = 12, seed: int = 0, masked_lm: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, t), generator=g)
        self.masked_lm = masked_lm

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if self.masked_lm:
            labels = torch.full_like(ids, -100)
            labels[1 + i % 3 :: 3] = ids[1 + i % 3 :: 3]
        if i % 4 == 1:  # padded
            mask[-1 - i % 5 :] = 0
            labels[-1 - i % 5 :] = -100
        if i % 4 == 2:  # completion-only: a prompt of a few tokens
            labels[: 2 + i % 5] = -100
        if i % 8 == 3:  # padding whose labels were left on
            mask[-3:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def training_args(tmp_path, **kw) -> T.TrainingArguments:
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=2,
                logging_steps=1, learning_rate=1e-2, max_steps=3, seed=0, max_grad_norm=0.0)
    base.update(kw)
    return T.TrainingArguments(**base)


class Capture:
    """Records, for each optimizer step, its micro-batches, their selections and the gradients
    just before the optimizer step."""

    def __init__(self, trainer):
        self.steps: list[dict] = []
        integration = trainer._cggr
        patched = trainer.get_batch_samples
        capture = self

        def get_batch_samples(*args, **kwargs):
            batches, total = patched(*args, **kwargs)
            capture.steps.append(dict(batches=batches, sels=list(integration.pending), total=total))
            return batches, total

        trainer.get_batch_samples = get_batch_samples

        class Grads(T.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                capture.steps[-1]["grads"] = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                                              if p.grad is not None}

        trainer.add_callback(Grads())


def right_pad(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def reference_grads(model, batches, sels, granularity: str, causal: bool = True):
    """One batch of every selected row (or every micro-batch, with only the selected tokens):
    mean cross-entropy over its valid positions (attention mask 1, label not -100)."""
    model = copy.deepcopy(model)
    model.zero_grad()
    ids, masks, labels, keeps = [], [], [], []
    length = max(b["input_ids"].shape[1] for b in batches)
    for b, s in zip(batches, sels):
        i, m, y = b["input_ids"], b["attention_mask"], b["labels"]
        target = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1) if causal else y
        keep = (target != -100) & (m != 0)
        if granularity == "sequences":
            i, m, keep = i[s.selection], m[s.selection], keep[s.selection]
            target = target[s.selection]
        else:
            keep = keep & s.selection
        ids.append(right_pad(i, length, 0))
        masks.append(right_pad(m, length, 0))
        labels.append(right_pad(target, length, -100))
        keeps.append(right_pad(keep, length, False))
    ids, masks, labels, keep = torch.cat(ids), torch.cat(masks), torch.cat(labels), torch.cat(keeps)
    logits = model(input_ids=ids, attention_mask=masks).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, int(keep.sum())


def assert_same_grads(got: dict, want: dict):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# transformers.Trainer
# ----------------------------------------------------------------------------------------------
def test_trainer_steps_schedule_per_optimizer_step_metrics_and_eval(tmp_path):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = dict(router_layers=1, min_tokens_ratio=0.25, warmup_steps=4, num_levels=4, dynamic_threshold=False,
                scoring="loss")
    trainer = T.Trainer(model=model, args=training_args(tmp_path, eval_strategy="steps", eval_steps=2),
                        train_dataset=Rows(32), eval_dataset=Rows(8, seed=5))
    cg = cggr_compile.enable_cggr(trainer, **opts)
    reported = []  # what reporting callbacks (TensorBoard, W&B, ...) receive

    class Report(T.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            reported.append(dict(logs))

    trainer.add_callback(Report())
    micro = []  # rows of each main pass (a hook on the model: the router runs its own clone)
    model.register_forward_pre_hook(
        lambda m, args, kwargs: micro.append(kwargs["input_ids"].shape[0]) if m.training else None, with_kwargs=True)
    trainer.train()
    # the schedule counts optimizer steps (3), not micro-batches (6)
    assert trainer.state.global_step == 3 and cg.schedule.step == 3 and len(micro) == 6
    assert trainer._cggr.on_the_fly == 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    for key in cggr_compile.integrations.METRIC_LOG_KEYS:
        assert all(key in h for h in logs), key
    levels = ratio_levels(0.25, 4)
    want_k = [rows_for_ratio(quantise_ratio(warmup_ratio(s, 4, 0.25), levels), 4) for s in range(3)]
    assert [h["cggr/k"] for h in logs] == want_k == [4, 4, 3]
    assert [h["cggr/step"] for h in logs] == [1, 2, 3]
    assert micro == [4, 4, 4, 4, 3, 3]  # the main pass saw the selected rows only
    assert all(0 < h["cggr/tokens_selected"] <= h["cggr/tokens_total"] for h in logs)
    assert all(0 < h["cggr/avg_confidence"] < 1 and h["cggr/avg_entropy"] > 0 for h in logs)
    assert any("eval_loss" in h for h in trainer.state.log_history)  # evaluation inside training
    assert [r["cggr/k"] for r in reported if "loss" in r] == want_k

    # evaluation: the plain model on the whole eval batch
    eval_loss = trainer.evaluate()["eval_loss"]
    batch = torch.utils.data.default_collate([Rows(8, seed=5)[i] for i in range(8)])
    model.eval()
    with torch.no_grad():
        want = model(**batch).loss.item()
    assert eval_loss == pytest.approx(want, rel=1e-6)


def test_resumed_training_resumes_the_schedule(tmp_path):
    opts = dict(router_layers=1, min_tokens_ratio=0.25, warmup_steps=4, num_levels=4, dynamic_threshold=False,
                scoring="loss")
    args = dict(save_strategy="steps", save_steps=2, max_steps=2)
    trainer = T.Trainer(model=tiny_model("llama"), args=training_args(tmp_path, **args), train_dataset=Rows(32))
    cggr_compile.enable_cggr(trainer, **opts)
    trainer.train()
    trainer = T.Trainer(model=tiny_model("llama"), args=training_args(tmp_path, **{**args, "max_steps": 3}),
                        train_dataset=Rows(32))
    cg = cggr_compile.enable_cggr(trainer, **opts)
    trainer.train(resume_from_checkpoint=True)
    (log,) = [h for h in trainer.state.log_history if "loss" in h and h["step"] == 3]
    assert log["cggr/k"] == 3 and log["cggr/step"] == 3 == cg.schedule.step  # planned at step 2, not 0


@pytest.mark.parametrize("name,granularity", [("llama", "sequences"), ("llama", "tokens"), ("bert", "sequences")])
def test_accumulation_gives_the_gradient_of_one_batch_of_the_selection(tmp_path, name, granularity):
    """Two micro-batches (gradient_accumulation_steps=2) == one batch of their selected rows/tokens.
    Llama goes through the model's own loss (num_items_in_batch), BERT (whose loss ignores the
    count) through CGGR's loss on its logits."""
    model = tiny_model(name)
    start = copy.deepcopy(model)
    trainer = T.Trainer(model=model, args=training_args(tmp_path, max_steps=1),
                        train_dataset=Rows(16, masked_lm=name == "bert"))
    cggr_compile.enable_cggr(trainer, granularity=granularity, **OPTS)
    cap = Capture(trainer)
    trainer.train()
    (step,) = cap.steps
    assert len(step["batches"]) == 2 and all(b["input_ids"].shape[0] == 4 for b in step["batches"])
    want, count = reference_grads(start, step["batches"], step["sels"], granularity, causal=name != "bert")
    assert int(step["total"]) == count  # the loss denominator: selected valid tokens of both micro-batches
    assert_same_grads(step["grads"], want)


def test_plain_loop_route_step_matches_one_batch_of_the_selection():
    model = tiny_model("llama")
    start = copy.deepcopy(model)
    cg = cggr_compile.transform(model, **OPTS)
    rows = Rows(8)
    batches = [torch.utils.data.default_collate([rows[i] for i in range(j, j + 4)]) for j in (0, 4)]
    steps = cggr_compile.route_step(cg, batches)
    assert [s["input_ids"].shape[0] for s in steps] == [2, 2]
    for inputs in steps:
        model(**inputs).loss.backward()
    sels = []
    for b in batches:  # the same selection again (the schedule has not moved)
        sels.append(cggr_compile.integrations._select(cg, b, record=False))
    want, count = reference_grads(start, batches, sels, "sequences")
    assert int(steps[0]["num_items_in_batch"]) == count
    assert_same_grads({n: p.grad for n, p in model.named_parameters()}, want)


def test_plain_loop_with_accelerate_as_in_the_readme():
    accelerate = pytest.importorskip("accelerate")
    import contextlib

    model = tiny_model("llama")
    start = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(Rows(8), batch_size=4)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    cg = cggr_compile.transform(accelerator.unwrap_model(model), **OPTS)
    for micro_batches in zip(*[iter(loader)] * 2):
        with accelerator.autocast():
            routed = cggr_compile.route_step(cg, micro_batches)
        for i, inputs in enumerate(routed):
            with accelerator.no_sync(model) if i < len(routed) - 1 else contextlib.nullcontext():
                accelerator.backward(model(**inputs).loss)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step(); optimizer.zero_grad(); cg.step()
    assert cg.schedule.step == 1
    sels = [cggr_compile.integrations._select(cg, b, record=False) for b in micro_batches]
    want, _ = reference_grads(start, list(micro_batches), sels, "sequences")
    assert_same_grads(grads, want)


def test_gradient_checkpointing_and_bf16(tmp_path):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = T.Trainer(model=model, args=training_args(tmp_path, max_steps=2, gradient_checkpointing=True, bf16=True),
                        train_dataset=Rows(16))
    cg = cggr_compile.enable_cggr(trainer, **OPTS)
    trainer.train()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert cg.schedule.step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["loss"] == h["loss"] and h["cggr/k"] == 2 for h in logs)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("how", ["torch.compile", "TrainingArguments"])
def test_compiled_model(tmp_path, how):
    model = tiny_model("llama")
    if how == "torch.compile":  # (Trainer cannot read a compiled forward's signature: keep the columns)
        args = training_args(tmp_path, max_steps=2, remove_unused_columns=False)
        trainer = T.Trainer(model=torch.compile(model, backend="eager"), args=args, train_dataset=Rows(16))
    else:
        args = training_args(tmp_path, max_steps=2, torch_compile=True, torch_compile_backend="eager")
        trainer = T.Trainer(model=model, args=args, train_dataset=Rows(16))
    cg = cggr_compile.enable_cggr(trainer, **OPTS)
    assert cg.model is model  # the router and the selection work on the module under torch.compile
    trainer.train()
    assert cg.schedule.step == 2
    assert all(h["cggr/k"] == 2 for h in trainer.state.log_history if "loss" in h)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the main pass ran compiled


def test_models_that_route_by_themselves_are_refused(tmp_path):
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="cggr", options={"router_layers": 1})
    trainer = T.Trainer(model=compiled, args=training_args(tmp_path), train_dataset=Rows(8))
    with pytest.raises(ValueError, match="backend='cggr'"):
        cggr_compile.enable_cggr(trainer, **OPTS)
    trainer = T.Trainer(model=cggr_compile.transform(tiny_model("llama"), **OPTS), args=training_args(tmp_path),
                        train_dataset=Rows(8))
    with pytest.raises(ValueError, match="already a CGGR model"):
        cggr_compile.enable_cggr(trainer, **OPTS)


# ----------------------------------------------------------------------------------------------
# TRL's SFTTrainer (optional: skipped where trl is not installed; the test extra installs it)
# ----------------------------------------------------------------------------------------------
def _sft_setup(tmp_path, packing: bool, **kw):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(2, 6))),
             "completion": " " + " ".join(rng.choices(words, k=rng.randint(2, 6)))} for _ in range(32)]
    model = tiny_model("llama")
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    start = copy.deepcopy(model)  # before TRL patches the model's forward (its fused head)
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                         per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
                         learning_rate=1e-2, seed=0, max_grad_norm=0.0, packing=packing, max_length=32, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
    return trainer, start


def test_sfttrainer_completion_only_padded(tmp_path):
    # fp32 (SFTConfig defaults to bf16) so that the gradients compare tightly
    trainer, start = _sft_setup(tmp_path, packing=False, max_steps=2, bf16=False)
    cg = cggr_compile.enable_cggr(trainer, **OPTS)
    cap = Capture(trainer)
    trainer.train()
    assert cg.schedule.step == 2 and trainer._cggr.on_the_fly == 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["loss"] == h["loss"] for h in logs)
    assert all("cggr/tokens_selected" in h and "mean_token_accuracy" in h for h in logs)  # TRL's metrics too
    # the batches are padded and their prompt tokens are -100 (completion-only loss)
    first = cap.steps[0]
    b = first["batches"][0]
    assert (b["attention_mask"] == 0).any()
    assert ((b["labels"] == -100) & (b["attention_mask"] == 1)).any()
    want, count = reference_grads(start, first["batches"], first["sels"], "sequences")
    assert int(first["total"]) == count
    assert_same_grads(first["grads"], want)


def test_sfttrainer_packed_padding_free(tmp_path):
    trainer, _ = _sft_setup(tmp_path, packing=True, max_steps=2)
    cg = cggr_compile.enable_cggr(trainer, granularity="tokens", **OPTS)
    cap = Capture(trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="cggr: the training batches have one row")
        trainer.train()
    b = cap.steps[0]["batches"][0]
    assert b["input_ids"].shape[0] == 1 and "position_ids" in b  # packed into one padding-free row
    assert cg.schedule.step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["loss"] == h["loss"] and 0 < h["cggr/selected_fraction"] < 1 for h in logs)


def test_sfttrainer_packed_rows_warn_for_sequences(tmp_path):
    trainer, _ = _sft_setup(tmp_path, packing=True, max_steps=1)
    cggr_compile.enable_cggr(trainer, **OPTS)
    with pytest.warns(UserWarning, match="one row"):
        trainer.train()


def test_trainer_with_a_reference_loss_column_routes_by_reducible_loss(tmp_path):
    """A dataset column computed once by cggr_compile.reference_losses reaches the router (the Trainer
    would drop it as unused by the model) and never the model; the rows follow the reducible loss."""
    datasets = pytest.importorskip("datasets")
    model = tiny_model("llama")
    rows = Rows(16)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in rows[i].items()} for i in range(len(rows))])
    ds = cggr_compile.reference_losses(tiny_model("llama", seed=7), ds, progress=False)
    trainer = T.Trainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=1, max_steps=2),
                        train_dataset=ds, data_collator=T.default_data_collator)
    cg = cggr_compile.enable_cggr(trainer, **dict(OPTS, scoring="reducible"))
    seen = []
    select = cg.select

    def recording_select(*args, **kwargs):
        seen.append(kwargs.get("reference_loss"))
        return select(*args, **kwargs)

    cg.select = recording_select
    trainer.train()
    assert seen and all(r is not None and r.shape == (4,) for r in seen)
    assert cg.schedule.step == 2


def test_enable_cggr_defaults_to_the_library_default(tmp_path):
    """The library's default, the learned exit with truncation, trains its rows unweighted, so the
    model's own loss serves: enable_cggr uses it as it is."""
    trainer = T.Trainer(model=tiny_model("llama"), args=training_args(tmp_path), train_dataset=Rows(8))
    cg = cggr_compile.enable_cggr(trainer, router_layers=1)
    assert (cg.cggr_config.selection, cg.cggr_config.scoring) == ("truncation", "predicted")


# ----------------------------------------------------------------------------------------------
# One name for the selection, a difficulty metric that means something
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["sequences", "tokens"])
def test_the_selection_has_one_name_on_every_entry_point(granularity):
    key = "selected_indices" if granularity == "sequences" else "selected_mask"
    opts = dict(OPTS, granularity=granularity)
    b = torch.utils.data.default_collate([Rows(8)[i] for i in range(8)])
    cg = cggr_compile.transform(tiny_model("llama"), **opts)
    out = cg(**b)
    assert torch.equal(cggr_compile.last_metrics(cg)[key], out[key]) and torch.equal(out.cggr_metrics[key], out[key])
    model = tiny_model("llama")
    torch.compile(model, backend="cggr", options=opts)(**b)
    assert torch.equal(cggr_compile.last_metrics(model)[key], out[key])
    plain = cggr_compile.transform(tiny_model("llama"), **opts)
    cggr_compile.route_step(plain, [b])
    assert torch.equal(cggr_compile.last_metrics(plain)[key], out[key])
    selection, _, metrics = plain.select(**b)
    assert torch.equal(metrics[key], selection)


def test_selected_difficulty_says_how_much_harder_the_selection_is(tmp_path):
    """Under 'combined' (z-scores) the batch's mean difficulty is ~0 by construction; the selected
    positions' mean is what the router chose, on the transform, the backend and in the Trainer's logs."""
    opts = dict(OPTS, scoring="combined")
    b = torch.utils.data.default_collate([Rows(8)[i] for i in range(8)])
    cg = cggr_compile.transform(tiny_model("llama"), **opts)
    m = cg(**b).cggr_metrics
    assert abs(float(m["avg_difficulty"])) < 1e-5
    assert float(m["selected_difficulty"]) > 0.1  # top-k by difficulty: well above the batch's mean
    r = cg.route(b["input_ids"], b["attention_mask"], b["labels"])
    w = r.valid.index_select(0, m["selected_indices"]).float()
    want = (r.difficulty.index_select(0, m["selected_indices"]) * w).sum() / w.sum()
    torch.testing.assert_close(m["selected_difficulty"], want)
    model = tiny_model("llama")
    torch.compile(model, backend="cggr", options=opts)(**b)
    torch.testing.assert_close(cggr_compile.last_metrics(model)["selected_difficulty"], want, rtol=1e-4, atol=1e-5)
    trainer = T.Trainer(model=tiny_model("llama"), args=training_args(tmp_path, max_steps=1), train_dataset=Rows(8))
    cggr_compile.enable_cggr(trainer, **dict(opts, selection="topk"))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "cggr/selected_difficulty" in h]
    assert logged and logged[0]["cggr/selected_difficulty"] > logged[0]["cggr/avg_difficulty"] + 0.1


# ----------------------------------------------------------------------------------------------
# scoring='predicted': the learned exit is fitted after each micro-batch's main pass
# ----------------------------------------------------------------------------------------------
PRED = dict(strict=True, router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, scoring="predicted",
            selection="topk", exit_min_fits=3)


def exit_scalar(cg, name: str) -> float:
    return float(cg.exit.layout.scalar(cg.exit.state, name))


def by_hand_exit(start, batches, opts: dict, causal: bool = True):
    """The exit after one fit per micro-batch of ``batches`` (one optimizer step) made by hand: a fresh
    CGGR model of the same start weights selects every micro-batch first (from the same cold exit: the
    same uniform draw), then per micro-batch the plain model's per-token cross-entropy in float64 on
    the trained rows (every row under 'tokens'), against the original labels, and ``fit_exit``.
    Returns the CGGR model and, per micro-batch, (selection, fit, aligned target of the fitted rows)."""
    model = copy.deepcopy(start)
    cg = cggr_compile.transform(model, **opts)
    picks = [cg.select(b["input_ids"], b["attention_mask"], b["labels"], return_fit_inputs=True) for b in batches]
    out = []
    for b, (selection, _, _, fit) in zip(batches, picks):
        y = b["labels"]
        target = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1) if causal else y
        ids, mask = b["input_ids"], b["attention_mask"]
        if opts.get("granularity", "sequences") == "sequences":
            ids, mask, target = ids[selection], mask[selection], target[selection]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.double()
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                                       reduction="none").view(target.shape)
        cg.fit_exit(fit, token_loss)
        out.append((selection, fit, target))
    return cg, out


def assert_same_exit(got, want, hidden: list):
    """The exit's statistics (sums of float32 products of the same hidden states) agree tightly; its
    weights solve a ridge system that a small batch leaves ill-conditioned, so they are compared by
    what they predict on the fitted hidden states."""
    layout = want.exit.layout
    g, w = got.exit.state, want.exit.state
    d = layout.dim
    torch.testing.assert_close(g[: d * d + d], w[: d * d + d], rtol=1e-5, atol=1e-5)  # gram, moment
    torch.testing.assert_close(g[d * d + 2 * d:], w[d * d + 2 * d:], rtol=1e-5, atol=1e-5, equal_nan=True)  # scalars
    for h in hidden:
        torch.testing.assert_close(got.exit.predict(g, h), want.exit.predict(w, h), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_fits_the_learned_exit_once_per_micro_batch(tmp_path, accumulation):
    """One fit per micro-batch (two per optimizer step under accumulation 2); the selection is uniform
    (exit_ready 0) until exit_min_fits fits, then the exit ranks; the logs carry cggr/exit_*."""
    trainer = T.Trainer(model=tiny_model("llama"), train_dataset=Rows(32),
                        args=training_args(tmp_path, max_steps=4, gradient_accumulation_steps=accumulation))
    cg = cggr_compile.enable_cggr(trainer, **PRED)
    micro = []
    cg.model.register_forward_pre_hook(
        lambda m, args, kwargs: micro.append(kwargs["input_ids"].shape[0]) if m.training else None, with_kwargs=True)
    trainer.train()
    assert len(micro) == 4 * accumulation and exit_scalar(cg, "fits") == 4 * accumulation
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["cggr/exit_fits"] for h in logs] == [accumulation * s for s in (1, 2, 3, 4)]
    # step s selects with the fits of steps < s: ready once they are exit_min_fits (3)
    want_ready = [float(accumulation * s >= 3) for s in (0, 1, 2, 3)]
    assert [h["cggr/exit_ready"] for h in logs] == want_ready
    assert all(key in h for h in logs for key in ("cggr/exit_ready", "cggr/exit_fits"))
    # R^2 is measured by the fits made while the exit is ready (NaN before: left out of the logs)
    assert "cggr/exit_r2" not in logs[0] and "cggr/exit_r2" in logs[-1]
    assert all(h["cggr/exit_r2"] == h["cggr/exit_r2"] for h in logs if "cggr/exit_r2" in h)
    assert float(cggr_compile.last_metrics(cg)["exit_fits"]) == 4 * accumulation


def test_trainer_logs_the_share_of_rows_truncation_skipped(tmp_path):
    """cggr/skipped_share is the mean over the optimizer step's micro-batches of the share of rows
    skipped: 0 while the exit is cold (a step selects all its micro-batches with the fits of the steps
    before it: 2 after step 1, 4 >= exit_min_fits = 3 after step 2), then the fixed truncation_share's
    floor(0.25 * 4) = 1 row of each micro-batch of 4."""
    trainer = T.Trainer(model=tiny_model("llama"), train_dataset=Rows(32),
                        args=training_args(tmp_path, max_steps=4, gradient_accumulation_steps=2))
    cg = cggr_compile.enable_cggr(trainer, **{**PRED, "selection": "truncation", "truncation_share": 0.25})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["cggr/skipped_share"] for h in logs] == pytest.approx([0.0, 0.0, 0.25, 0.25])
    assert [h["cggr/exit_ready"] for h in logs] == [0, 0, 1, 1]
    skipped = cggr_compile.last_metrics(cg)["skipped"]
    assert skipped.shape == (4,) and int(skipped.sum()) == 1


@pytest.mark.parametrize("name,granularity", [("llama", "sequences"), ("llama", "tokens"), ("bert", "sequences")])
def test_trainer_exit_fit_matches_a_fit_by_hand(tmp_path, name, granularity):
    """The exit's state after one Trainer micro-batch == select + fit_exit by hand with the per-token
    cross-entropy in float64 of the plain model. Under 'tokens' every valid position of the micro-batch
    fits, against the original labels (the relabelled ones are -100 on the unselected tokens). BERT
    goes through CGGR's own loss (its logits), Llama through the model's loss (the Trainer's outputs)."""
    model = tiny_model(name)
    start = copy.deepcopy(model)
    trainer = T.Trainer(model=model, args=training_args(tmp_path, max_steps=1, gradient_accumulation_steps=1),
                        train_dataset=Rows(8, masked_lm=name == "bert"))
    opts = dict(PRED, granularity=granularity)
    cg = cggr_compile.enable_cggr(trainer, **opts)
    cap = Capture(trainer)
    trainer.train()
    (step,) = cap.steps
    (batch,), (sel,) = step["batches"], step["sels"]
    want, [(selection, fit, target)] = by_hand_exit(start, [batch], opts, causal=name != "bert")
    assert torch.equal(selection, sel.selection)
    valid = (target != -100) & ((batch["attention_mask"][selection] if granularity == "sequences"
                                 else batch["attention_mask"]) != 0)
    assert int(fit.weight.sum()) == int(sel.fit.weight.sum()) == int(valid.sum())
    if granularity == "tokens":  # every valid position of the micro-batch, not only the selected tokens
        assert int(valid.sum()) > int(sel.weight.sum())
    assert exit_scalar(cg, "fits") == 1 and exit_scalar(cg, "weight_sum") == int(valid.sum())
    assert_same_exit(cg, want, [fit.hidden])


def test_plain_loop_route_step_fits_the_learned_exit():
    """route_step fits the exit once per micro-batch, after the loop's own forward on each routed dict
    (a forward hook, gone once the step's micro-batches have fitted), as a fit by hand would."""
    model = tiny_model("llama")
    start = copy.deepcopy(model)
    cg = cggr_compile.transform(model, **PRED)
    rows = Rows(8)
    batches = [torch.utils.data.default_collate([rows[i] for i in range(j, j + 4)]) for j in (0, 4)]
    for inputs in cggr_compile.route_step(cg, batches):
        model(**inputs).loss.backward()
    assert exit_scalar(cg, "fits") == 2 and not model._forward_hooks
    # by hand: both micro-batches selected from the cold exit, then fitted one after the other
    want, fits = by_hand_exit(start, batches, PRED)
    assert_same_exit(cg, want, [f.hidden for _, f, _ in fits])
    # a step whose routed dicts never reach the model: said at the next route_step, not silently
    cggr_compile.route_step(cg, batches)
    with pytest.warns(UserWarning, match="not fitted on 2 micro-batch"):
        cggr_compile.route_step(cg, batches)
    assert exit_scalar(cg, "fits") == 2


def test_trainer_without_logits_warns_once_and_keeps_the_exit_cold(tmp_path):
    """A training forward that returns its loss but no logits (a fused head): a clear warning, no crash."""
    model = tiny_model("llama")
    trainer = T.Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=Rows(16))
    cg = cggr_compile.enable_cggr(trainer, **PRED)
    forward = model.forward

    @functools.wraps(forward)
    def loss_only(*args, **kwargs):
        return T.modeling_outputs.CausalLMOutputWithPast(loss=forward(*args, **kwargs).loss)

    model.forward = loss_only
    with pytest.warns(UserWarning, match="cannot fit its learned exit") as record:
        trainer.train()
    assert sum("cannot fit its learned exit" in str(w.message) for w in record) == 1
    assert cg.exit.state is None or exit_scalar(cg, "fits") == 0
    assert all(h["cggr/exit_ready"] == 0 for h in trainer.state.log_history if "loss" in h)


def test_sfttrainer_fits_the_exit_from_the_fused_heads_log_probs(tmp_path):
    """TRL's fused LM head returns per-token log-probabilities, no logits: under 'sequences' they fit
    the exit (the same labels at every fitted position), as the logits' cross-entropy would."""
    trainer, start = _sft_setup(tmp_path, packing=False, max_steps=1, bf16=False)
    cg = cggr_compile.enable_cggr(trainer, **PRED)
    cap = Capture(trainer)
    forwards = []  # no extra forward (TRL recomputes the logits when compute_loss returns its outputs)
    trainer.model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw.get("fused_lm_head")), with_kwargs=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="cggr: scoring='predicted' cannot fit")
        warnings.filterwarnings("error", message=".*return_outputs=True.*")
        trainer.train()
    assert forwards == [True, True]  # one fused main pass per micro-batch
    (step,) = cap.steps
    want, fits = by_hand_exit(start, step["batches"], PRED)
    assert [torch.equal(f[0], s.selection) for f, s in zip(fits, step["sels"])] == [True, True]
    assert exit_scalar(cg, "fits") == 2
    assert_same_exit(cg, want, [f.hidden for _, f, _ in fits])


def test_sfttrainer_fused_head_under_tokens_warns(tmp_path):
    trainer, _ = _sft_setup(tmp_path, packing=True, max_steps=1)
    cg = cggr_compile.enable_cggr(trainer, granularity="tokens", **PRED)
    with pytest.warns(UserWarning, match="granularity='tokens' leaves at -100"):
        trainer.train()
    assert cg.exit.state is None or exit_scalar(cg, "fits") == 0
