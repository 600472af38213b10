"""The ``cggr`` Dynamo backend: ``torch.compile(model, backend="cggr", options={...})``.

For each captured graph: recognise it (``passes/recognise_training_graph``); if it is a training
step of a supported model with labels, build the rewritten step for the schedule's current plan
(a ``RoutedPlan``: ``k``, ...) with the pass pipeline (``passes/pipeline.PASSES``: trace the step
with the router's scoring unfused, then ``passes/fuse_scorer`` puts the fused scorer op in where it
pays) and compile it with Inductor on CUDA, or run the same graph with eager ops elsewhere. One
rewritten graph is built per distinct plan, lazily, so a whole warmup schedule compiles at most
``num_levels`` times, all with the default static shapes.

Where it cannot rewrite it warns once, naming the reason and what to do, and compiles the graph
unmodified. Eval mode, ``torch.no_grad()`` and calls without labels are compiled unmodified
without a warning: they must run exactly as without CGGR.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from cggr_compile.config import CGGRConfig
from cggr_compile.errors import fall_back
from cggr_compile.distributed import active_ddp_bucket_bytes, active_ddp_module, compile_in_ddp_buckets
from cggr_compile.passes.pass_context import PassContext
from cggr_compile.passes.pipeline import run_passes
from cggr_compile.passes.recognise_training_graph import GraphPlan, NotRewritable, recognise
from cggr_compile.passes.trace_routed_step import metric_keys, reference_tensors, routed_step_fn, step_inputs
from cggr_compile.graph_text import graph_text
from cggr_compile.router import model_call_for
from cggr_compile.schedule import RoutedPlan
from cggr_compile.metrics import step_metrics
from cggr_compile.transform import CGGRModel, check_reference_loss_is_read

_warned: set[str] = set()
# Each model's CGGR core (router, schedule, metrics) lives in the model's own __dict__ under this
# name (not a submodule: parameters() and state_dict() are unchanged), so every graph of one model
# shares one schedule and the core is freed with the model.
_CORE_ATTR = "_cggr_core"
# load_cggr_state_dict before the backend built the core: applied by core_for.
_PENDING_STATE_ATTR = "_cggr_pending_state"


def core_of(model: torch.nn.Module) -> Optional[CGGRModel]:
    """The CGGR core (router, schedule, compiled levels) the backend built for ``model``, if any."""
    return model.__dict__.get(_CORE_ATTR)


def warn_once(reason: str, strict: bool = False) -> None:
    """Fall back (compile the graph unmodified) with a warning once per reason, or raise if ``strict``."""
    message = f"cggr backend: not rewriting this graph: {reason.rstrip('.')}. It is compiled unmodified."
    if strict or reason not in _warned:
        _warned.add(reason)
        fall_back(message, strict, stacklevel=3)


def _frame_modules(f_locals: dict) -> list[torch.nn.Module]:
    """The ``nn.Module`` objects among a frame's locals and the items of its tuple / dict locals
    (a decorator's ``wrapper(*args, **kwargs)`` holds the model in ``args[0]``), ``self`` first."""
    found: list[torch.nn.Module] = []

    def add(value: Any) -> None:
        if isinstance(value, torch.nn.Module) and all(value is not m for m in found):
            found.append(value)

    add(f_locals.get("self"))
    for value in f_locals.values():
        add(value)
        if isinstance(value, (tuple, list)):
            for item in value:
                add(item)
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
    return found


def _owns_parameters(module: torch.nn.Module, wanted: set[int]) -> bool:
    own = {id(p) for p in module.parameters()}
    own.update(id(b) for b in module.buffers())
    return wanted <= own


def _captured_frame(example_inputs: Sequence[Any] = ()) -> tuple[Optional[torch.nn.Module], dict]:
    """The module being compiled and the call's arguments, by name.

    Dynamo hands a backend the graph, not the module. This reads the frame Dynamo is translating
    (a private API, pinned by tests on each supported torch and transformers version). That frame
    is the model's ``forward`` (its parameters are locals), or a decorator's wrapper around it
    (transformers' ``can_return_tuple`` is ``wrapper(self, *args, **kwargs)``; 5.24's
    ``deprecate_kwarg`` is ``wrapped_func(*args, **kwargs)``, with the model in ``args[0]``).
    The module is found by identity, not by a local's name: the module among the frame's locals
    (and their items) that owns every parameter the graph lifted from ``example_inputs``. Positional
    arguments are named through the forward's signature, so ``model(ids, labels=y)`` is understood
    like ``model(input_ids=ids, ...)``.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = dict(InstructionTranslator.current_tx().f_locals)
    except Exception:  # noqa: BLE001 - any failure means "unknown", never a crash
        return None, {}
    wanted = {id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)}
    candidates = [m for m in _frame_modules(f_locals) if _owns_parameters(m, wanted)]
    if not candidates:
        return None, {}
    # the innermost module that owns them all (a wrapper module also owns its child's parameters)
    module = min(candidates, key=lambda m: sum(1 for _ in m.parameters()))
    try:
        sig = inspect.signature(inner_forward(module))
    except (TypeError, ValueError):
        return module, dict(f_locals.get("kwargs") or {})
    params = sig.parameters
    var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
    if "args" in f_locals and "kwargs" in f_locals and "args" not in params:
        args = tuple(f_locals["args"] or ())
        if args and args[0] is module:  # wrapped_func(*args): the bound method's self comes first
            args = args[1:]
        try:
            bound = sig.bind_partial(*args, **(f_locals["kwargs"] or {})).arguments
        except TypeError:
            bound = dict(f_locals["kwargs"] or {})
    else:
        bound = {n: f_locals[n] for n in params if n in f_locals}
    extra = bound.pop(var_kw, None) if var_kw else None
    if isinstance(extra, dict):
        bound.update(extra)
    return module, bound


def _inside_ddp() -> bool:
    """Whether DDP's graph splitter is calling us with one bucket's fragment."""
    try:
        splitting = torch._dynamo.utils.get_optimize_ddp_mode() == "ddp_optimizer"
    except Exception:  # noqa: BLE001 - a torch without this private API
        return False
    return splitting and active_ddp_module() is not None


def core_for(model: torch.nn.Module, options: Optional[dict] = None) -> CGGRModel:
    """The CGGR core (router, schedule, metrics) the backend uses for ``model``."""
    config = CGGRConfig.from_options(options)
    core = core_of(model)
    if core is None or core.cggr_config != config:  # first compile, or compiled again with new options
        core = CGGRModel(model, config)
        model.__dict__[_CORE_ATTR] = core
        pending = model.__dict__.pop(_PENDING_STATE_ATTR, None)
        if pending is not None:
            core.load_cggr_state_dict(pending)
    return core


def _any_core(model: torch.nn.Module) -> Optional[CGGRModel]:
    """The CGGR core of any kind of CGGR model: compiled with ``backend="cggr"``, a
    ``cggr_compile.transform`` (or ``CGGRModel``), or either under ``torch.compile``."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, CGGRModel) else core_of(model)


def _core_or_error(model: torch.nn.Module, what: str) -> CGGRModel:
    core = _any_core(model)
    if core is None:
        raise ValueError(
            f"cggr_compile.{what}: {type(model).__name__} is no CGGR model (compile it with backend='cggr' and run a "
            "training step first, or wrap it with cggr_compile.transform)."
        )
    return core


def step(model: torch.nn.Module) -> None:
    """Advance the CGGR schedule once (call once per optimizer step), for every kind of CGGR model.

    A model that is no CGGR model is an error: a silent no-op would keep ``k = B`` forever."""
    _core_or_error(model, "step").step()


def last_metrics(model: torch.nn.Module) -> dict[str, Any]:
    """The last CGGR training step's metrics and selection (device tensors), for every kind of CGGR
    model; ``{}`` before its first training step."""
    core = _any_core(model)
    return core.metrics() if core is not None else {}


def cggr_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """CGGR's own state of any kind of CGGR model (the schedule's step, the learned exit's
    statistics), apart from ``model.state_dict()``, which stays the model's: save both on a
    checkpoint (the Trainer integration does). See :meth:`CGGRModel.cggr_state_dict`."""
    return _core_or_error(model, "cggr_state_dict").cggr_state_dict()


def load_cggr_state_dict(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Restore :func:`cggr_state_dict` into any kind of CGGR model. A model to be compiled with
    ``backend="cggr"`` gets its CGGR core at its first training step: loaded before that (on the
    model or the compiled module), the state is kept and applied when the core is built."""
    core = _any_core(model)
    if core is not None:
        core.load_cggr_state_dict(state)
        return
    getattr(model, "_orig_mod", model).__dict__[_PENDING_STATE_ATTR] = dict(state)


def routed_graph(
    core: CGGRModel, plan: GraphPlan, routed: RoutedPlan, example_inputs: Sequence[Any], call_kwargs: dict,
    dynamo_gm: fx.GraphModule, carry_dynamo_sources: bool = True,
) -> fx.GraphModule:
    """The rewritten step for ``routed``, built from Dynamo's graph by the pass pipeline
    (``passes/pipeline.py:PASSES``): traced with the router's scoring unfused (head, then
    ``scoring.token_stats``), then ``passes/fuse_scorer`` replaces that subgraph by the fused scorer
    op where it pays. So the fusion in a compiled graph is the pass's decision, visible in the graph
    (``gm.meta["cggr_fuse_scorer"]`` says what it did, or why not; ``gm.meta["cggr_passes"]`` what
    every pass did), not the router code's."""
    context = PassContext(core, plan, routed, example_inputs, call_kwargs, carry_dynamo_sources,
                          _autocast_dtype(example_inputs))
    return run_passes(dynamo_gm, context)


def _autocast_dtype(example_inputs: Sequence[Any]) -> Optional[torch.dtype]:
    """The autocast dtype in force for the inputs' device while the step is traced, if any."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def compile_plain(gm: fx.GraphModule, example_inputs: Sequence[Any], cudagraphs: bool = False) -> Callable:
    """Inductor where it generates GPU code (with CUDA graphs if asked), the graph's own eager ops elsewhere."""
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs), config_patches={"triton.cudagraphs": True} if cudagraphs else None)
    return gm.forward


class RoutedGraph:
    """The callable the backend returns for a rewritable training graph."""

    def __init__(self, core: CGGRModel, plan: GraphPlan, example_inputs: Sequence[Any], call_kwargs: dict,
                 dynamo_gm: fx.GraphModule, cudagraphs: bool = False, ddp_bucket_bytes: Optional[int] = None):
        self.core = core
        self.dynamo_gm = dynamo_gm
        self.cudagraphs = cudagraphs
        self.ddp_bucket_bytes = ddp_bucket_bytes
        self.plan = plan
        self.example_inputs = list(example_inputs)
        self.call_kwargs = call_kwargs
        # One graph per RoutedPlan, as it compares: k, and for granularity="tokens" the token ratio
        # too (both baked in); the step counter is an input, not part of the key.
        self.compiled: dict[RoutedPlan, Callable] = {}
        self.references = reference_tensors(core)  # scoring='reducible' with reference=: its weights
        self.graphs: dict[RoutedPlan, fx.GraphModule] = {}
        # Dynamo shares one graph between instances of a class (their parameters are its inputs), but
        # this one routes with its model's core (schedule, metrics): one of its parameters tells.
        self.owner_param = next(((p, example_inputs[p]) for p in plan.others
                                 if isinstance(example_inputs[p], torch.nn.Parameter)), None)

    def graph_for(self, routed: RoutedPlan) -> fx.GraphModule:
        """The rewritten graph for ``routed`` (built once per distinct plan)."""
        if routed not in self.graphs:
            self.graphs[routed] = routed_graph(self.core, self.plan, routed, self.example_inputs, self.call_kwargs,
                                               self.dynamo_gm)
        return self.graphs[routed]

    def compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """One level's graph compiled whole, or (under DDP) cut at DDP's buckets so that the gradient
        all-reduces overlap the backward."""
        plain = functools.partial(compile_plain, cudagraphs=self.cudagraphs)
        if self.ddp_bucket_bytes is not None:
            try:
                return compile_in_ddp_buckets(gm, example_inputs, plain, self.ddp_bucket_bytes)
            except Exception as err:  # noqa: BLE001 - DDPOptimizer is private API: train unsplit rather than fail
                warnings.warn(f"cggr backend: could not cut the step at DDP's buckets ({type(err).__name__}: {err}); "
                              "it is compiled whole, so the gradient all-reduces wait for the whole backward. "
                              "options={'ddp_buckets': False} silences this.", stacklevel=2)
        return plain(gm, example_inputs)

    def run(self, routed: RoutedPlan, args: Sequence[Any]) -> tuple:
        """The rewritten step for ``routed`` on Dynamo's graph arguments ``args``: compiled once per plan."""
        fn = self.compiled.get(routed)
        extra = step_inputs(self.core, routed, self.references)
        if fn is None:
            gm = self.graph_for(routed)
            fn = self.compile(gm, list(args) + extra)
            self.compiled[routed] = fn
        return fn(*args, *extra)

    def check_owner(self, args: Sequence[Any]) -> None:
        """Raise if ``args`` are another model's: its schedule would silently be this model's."""
        if self.owner_param is not None and args[self.owner_param[0]] is not self.owner_param[1]:
            raise RuntimeError(
                f"cggr backend: Dynamo reused the training graph it compiled for another "
                f"{type(self.core.model).__name__} (it shares graphs between instances of a class), so this "
                "model would train with that one's CGGR schedule and metrics; call torch._dynamo.reset() "
                "before compiling another model in the same process, or train cggr_compile.transform(model)."
            )

    def __call__(self, *args: Any) -> tuple:
        core, plan = self.core, self.plan
        self.check_owner(args)
        ids = args[plan.inputs["input_ids"]]
        routed = core.plan_step(plan.batch, ids.device)
        loss, logits, selection, *extras = self.run(routed, args)
        keys = metric_keys(core)
        exit_state = extras[len(keys)] if core.exit is not None else None
        # The graph computed the device statistics; the host values come from the plan.
        metrics = step_metrics(core.cggr_config, core.schedule, dict(zip(keys, extras)), routed.ratio,
                               routed.k, selection)
        core.record_step(metrics, exit_state)
        outs: list[Any] = [loss.new_empty(0)] * plan.num_outputs  # caches: a training step has none
        outs[plan.loss_output] = loss
        if plan.logits_output >= 0:
            outs[plan.logits_output] = logits
        return tuple(outs)


# Where carry_reference_loss keeps the model's forward that its own forward wraps.
_INNER_FORWARD_ATTR = "_cggr_inner_forward"


def _keep_graph_input(tensor: torch.Tensor) -> None:
    """Nothing at run time. Traced by Dynamo (allowed in the graph, marked side-effectful), it is a
    use of ``tensor`` that dead-code elimination keeps, so ``tensor`` stays a graph input."""


def _forward_keeping_reference_loss(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    reference_loss = kwargs.get("reference_loss")
    if isinstance(reference_loss, torch.Tensor):
        _keep_graph_input(reference_loss)
    return self.__dict__[_INNER_FORWARD_ATTR](*args, **kwargs)


def inner_forward(module: torch.nn.Module) -> Callable:
    """``module``'s forward, under :func:`carry_reference_loss`'s wrapper if it has one."""
    return module.__dict__.get(_INNER_FORWARD_ATTR, module.forward)


def carry_reference_loss(module: torch.nn.Module) -> None:
    """Make every later capture of ``module`` take the batch's ``reference_loss=`` as a graph input.

    A model that ignores the keyword (every Hugging Face model: it lands in ``**kwargs``) leaves
    the tensor unused, and Dynamo drops unused inputs, so the rewritten step could not score by it.
    This wraps the module's forward (once) in one that hands the tensor to :func:`_keep_graph_input`
    first. A forward pre-hook would not do: Dynamo starts its capture at the model's own forward
    frame (torch's ``Module.__call__`` is not a frame it compiles), so a hook's use of the tensor lands
    in a graph of its own. The wrapper is a new frame, so the next call is captured afresh, the model's
    forward inlined. Bound as a method, it follows the module through ``copy.deepcopy``."""
    if _INNER_FORWARD_ATTR in module.__dict__:
        return
    torch._dynamo.allow_in_graph(_keep_graph_input)
    torch.fx.node.has_side_effect(_keep_graph_input)
    module.__dict__[_INNER_FORWARD_ATTR] = module.forward
    module.forward = types.MethodType(_forward_keeping_reference_loss, module)


class FirstStepWithoutReferenceInput(RoutedGraph):
    """The callable for the first capture of a model whose batch carries ``reference_loss`` that
    its graph lacks (Dynamo dropped the unused input), for that one call.

    Its call installs :func:`carry_reference_loss`'s wrapper, so that the next call is captured
    again with the tensor as an input, and runs the routed step eagerly, once, on the tensor the
    compile saw: the same call's. Compiling it would be wasted (it never runs again). A second call
    means Dynamo kept this graph: it has no reference loss to score by, so it raises rather than train
    on a stale one."""

    def __init__(self, core: CGGRModel, plan: GraphPlan, example_inputs: Sequence[Any], call_kwargs: dict,
                 dynamo_gm: fx.GraphModule, reference_loss: torch.Tensor, module: torch.nn.Module):
        plan = dataclasses.replace(plan, inputs={**plan.inputs, "reference_loss": len(example_inputs)})
        super().__init__(core, plan, list(example_inputs) + [reference_loss], call_kwargs, dynamo_gm)
        self.module = module
        self.reference_loss: Optional[torch.Tensor] = reference_loss

    def run(self, routed: RoutedPlan, args: Sequence[Any]) -> tuple:
        if self.reference_loss is None:
            raise RuntimeError(
                "cggr backend: Dynamo ran again the graph it captured before the batch's reference_loss was "
                "made a graph input, so this step has no reference loss; train cggr_compile.transform(model) "
                "(torch.compile it if you like), which reads reference_loss= directly, or pass "
                "options={'reference': reference_model}."
            )
        carry_reference_loss(self.module)
        args = list(args) + [self.reference_loss]
        self.reference_loss = None  # the next call's batch is another one
        step = routed_step_fn(self.core, self.plan, routed, self.example_inputs, self.call_kwargs)
        return step(*args, *step_inputs(self.core, routed, self.references))


def cggr_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **options: Any) -> Callable:
    """Dynamo backend entry point (registered as ``"cggr"``).

    ``options`` are CGGRConfig's fields, plus ``cudagraphs`` (bool: Inductor's CUDA graphs for the
    compiled graphs, on CUDA; ``torch.compile(..., mode="reduce-overhead")`` also turns them on) and
    ``ddp_buckets`` (bool, default True: under DDP, which needs ``optimize_ddp = False`` for this
    backend, compile the rewritten step cut at DDP's bucket boundaries, so that the gradient
    all-reduces overlap the backward as with DDP's own graph splitting).
    With CUDA graphs a step's outputs (loss, metrics) live in graph memory that the next step
    overwrites: clone what you keep across steps.
    """
    mode = options.get("mode")
    if mode not in (None, "default", "reduce-overhead"):
        raise ValueError(f"cggr backend: mode={mode!r} is not supported; use mode=None, 'default' or 'reduce-overhead' "
                         "(CUDA graphs), or options={...} with CGGR's options")
    given = options["options"] if "options" in options else {k: v for k, v in options.items() if k != "mode"}
    config_options = dict(given or {})
    cudagraphs = bool(config_options.pop("cudagraphs", mode == "reduce-overhead"))
    ddp_buckets = bool(config_options.pop("ddp_buckets", True))
    # bad options fail here, with the config's message
    config = CGGRConfig.from_options(config_options)
    strict = config.strict
    module, call_kwargs = _captured_frame(example_inputs)
    # The model's names for its tokens, labels and mask (nanoGPT's idx / targets) become CGGR's here.
    aliases = model_call_for(module, config.model_call, config.router_spec).aliases() if module is not None else {}
    call_kwargs = {aliases.get(k, k): v for k, v in call_kwargs.items()}

    def plain() -> Callable:
        return compile_plain(gm, example_inputs, cudagraphs)

    try:
        plan = recognise(gm, example_inputs, call_kwargs, aliases)
    except NotRewritable as err:
        if _inside_ddp():
            warn_once(
                "DDP's graph splitting (torch._dynamo.config.optimize_ddp) cut the model's graph into "
                "buckets; set torch._dynamo.config.optimize_ddp = False for the cggr backend, or "
                "compile DDP(cggr_compile.transform(model)), whose rewrite survives the split", strict
            )
        elif "without labels" not in str(err):
            warn_once(str(err), strict)
        return plain()
    if module is None:
        warn_once("the module being compiled could not be found among the compiled frame's locals "
                  "(compile the model itself, not a function that calls it, or use "
                  "cggr_compile.transform(model))", strict)
        return plain()
    if not torch.is_grad_enabled() or not module.training:
        return plain()
    # A bad option for this model (router_layers beyond its depth...) is the user's to fix: an
    # error, never a fallback that would train the whole batch.
    core = core_for(module, config_options)
    given = call_kwargs.get("reference_loss")
    if isinstance(given, torch.Tensor) and "reference_loss" not in plan.inputs:
        check_reference_loss_is_read(config, given)
        first = FirstStepWithoutReferenceInput(core, plan, example_inputs, call_kwargs, gm, given, module)
        core.routed_graphs.append(first)
        return first
    routed = RoutedGraph(core, plan, example_inputs, call_kwargs, gm, cudagraphs,
                         active_ddp_bucket_bytes() if ddp_buckets else None)
    core.routed_graphs.append(routed)
    return routed


class _LoggerMethodEntry(str):
    """``fn`` as an entry of ``torch._dynamo.config.ignore_logger_methods`` that is also a string.

    Dynamo looks the method up by membership (hash and equality are ``fn``'s), while torch < 2.12
    JSON-dumps that set when it logs compile metrics and fails on a bare callable; as a ``str`` the
    entry dumps as the function's name. It survives the config's deep copies (``__reduce__``)."""

    fn: Callable

    def __new__(cls, fn: Callable) -> "_LoggerMethodEntry":
        entry = super().__new__(cls, f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}")
        entry.fn = fn
        return entry

    def __reduce__(self) -> tuple:
        return (_LoggerMethodEntry, (self.fn,))

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return other is self.fn or (isinstance(other, _LoggerMethodEntry) and other.fn is self.fn)


def _quiet_transformers_warnings() -> None:
    """Let Dynamo trace through transformers' ``logger.warning_once`` instead of breaking the graph.

    GPT-2 (and other models without a ``loss_type``) warn from their loss; that warning's graph
    break would cut the loss off the captured graph and stop the rewrite.
    """
    try:
        from transformers.utils import logging as hf_logging

        fn = getattr(hf_logging, "warning_once", None)
        methods = torch._dynamo.config.ignore_logger_methods
        if fn is not None and fn not in methods:
            methods.add(_LoggerMethodEntry(fn))
    except Exception:  # noqa: BLE001 - an older torch without the option: the break stays
        pass


def explain(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None, full: bool = False, **options: Any,
) -> str:
    """The rewritten training graph for ``model`` on an example batch, as text.

    Summary by default (router, selection, main pass and loss ops with their shapes); ``full=True``
    gives every node. The model's own state (schedule, caches of the backend) is not touched.
    The model is called by its own names (``ModelCall``: nanoGPT's ``idx`` and ``targets``...).
    """
    captured: dict[str, Any] = {}
    config = CGGRConfig.from_options(options)
    call = model_call_for(model, config.model_call, config.router_spec)
    aliases = call.aliases()

    def capture(gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        module, call_kwargs = _captured_frame(example_inputs)
        names = "".join(n.name for n in gm.graph.nodes if n.op == "placeholder")
        if "gm" not in captured and call.inputs in names:
            captured.update(gm=gm, example_inputs=list(example_inputs), call_kwargs=call.canonical(call_kwargs))
        return gm.forward

    labels = input_ids if labels is None else labels
    if call.labels is None:
        raise ValueError(
            f"explain: {type(model).__name__}'s forward takes no labels, so its graph has no loss to route; "
            "explain the module that computes the loss (loss_fn(model(tokens), labels)) instead."
        )
    kwargs = {call.inputs: input_ids, call.labels: labels}
    if call.attention_mask is not None and attention_mask is not None:
        kwargs[call.attention_mask] = attention_mask
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            torch.compile(model, backend=capture)(**kwargs)
    finally:
        model.train(was_training)
    if "gm" not in captured:
        raise ValueError("explain: Dynamo captured no graph with input_ids for this model")
    plan = recognise(captured["gm"], captured["example_inputs"], captured["call_kwargs"], aliases)
    core = CGGRModel(model, config)
    routed = core.plan_step(plan.batch, input_ids.device)
    gm = routed_graph(core, plan, routed, captured["example_inputs"], captured["call_kwargs"], captured["gm"],
                      carry_dynamo_sources=False)
    return graph_text(gm, full)


def register() -> None:
    _quiet_transformers_warnings()
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "cggr" not in _BACKENDS or _BACKENDS.get("cggr") is None:
        register_backend(compiler_fn=cggr_backend, name="cggr")
