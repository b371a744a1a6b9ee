"""Resume at any layout: a checkpoint saved at one (TP, PP, DP, ZeRO stage) read as full tensors, then put
into an engine built at another.

Why our own layout-free form and not DeepSpeed's universal checkpoint: ``ds_to_universal`` reads only ZeRO
optimizer files (a ZeRO 0 run keeps its Adam moments in the torch optimizer's state dict, which it does not
read), its ZeRO 3 support is for data parallelism only, and it must be taught every parameter's split through
pattern lists kept apart from the model. The model already knows its splits
(``gpt.tensor_parallel_layout``: partition dim and fused parts of every parameter, what the HF converters use),
so the conversion is: read each model-parallel rank's files into full-DP tensors, merge the TP shards with
that rule (and the pipeline stages by name), then slice again for the new layout.

    read_full_state(ckpt)            -> FullState: GPTModel names -> full fp32 master weights, Adam exp_avg and
                                        exp_avg_sq, Adam's step; from DeepSpeed's files at any ZeRO stage:
        ZeRO 0, fp32     mp_rank_XX files: the module (or layer_XX files) + the torch optimizer's state dict
        ZeRO 0, bf16     mp_rank_XX files: DeepSpeed's FP16_Optimizer (fp32_groups_flat, flat moments)
        ZeRO 1-2 / bf16  *zero_pp_rank_D_mp_rank_XX_optim_states.pt: each DP rank's flat fp32 partition and
                         moments with ``param_slice_mappings`` (name -> fragment of that partition)
        ZeRO 3           zero_pp_rank_D_mp_rank_XX_{model,optim}_states.pt: every parameter split evenly
                         (padded) over the DP ranks, in ``param_shapes`` order
    apply_full_state(engine, full)   this rank's slices into the engine (module weights, fp32 masters, moments,
                                     step) through DeepSpeed's ``safe_set_full_*`` for ZeRO 1-3 / bf16

Model-parallel rank XX of DeepSpeed's file names is ``pp_rank * TP + tp_rank``; ``layer_II-model_TT`` files hold
pipeline layer II of TP rank TT (``gpt.pipeline_layer_prefixes`` names its GPTModel prefix).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from megatron_slung.parallel.layers import merge_tensor_parallel_shards, split_for_tensor_parallel

MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """A checkpoint whose files this conversion cannot read (the message names the file)."""


@dataclass
class FullState:
    """A checkpoint's model and optimizer state, free of any layout (GPTModel names, TP=1 shapes)."""

    weights: Dict[str, torch.Tensor]  # fp32 master weights (the module's own where there is no optimizer state)
    moments: Optional[Dict[str, Dict[str, torch.Tensor]]]  # "exp_avg"/"exp_avg_sq" -> name -> tensor; None: none saved
    step: Optional[int]  # Adam's step count (None without optimizer state)


def _load(path: str):
    from megatron_slung.training.checkpointing import safe_torch_load

    try:
        with safe_torch_load():
            return torch.load(path, map_location="cpu")
    except FileNotFoundError:
        raise ReshardError(f"{path}: missing checkpoint file") from None


def describe(layout: dict) -> str:
    return (f"TP {layout.get('tensor_model_parallel_size')} x PP {layout.get('pipeline_model_parallel_size')} x "
            f"DP {layout.get('data_parallel_size')}, ZeRO {layout.get('zero_stage')}"
            + (", sequence parallel" if layout.get("sequence_parallel") else ""))


def needs_conversion(saved: dict, now: dict) -> bool:
    """DeepSpeed's own loading handles a change of DP at ZeRO 0 (its files do not depend on DP) and of sequence
    parallelism (no weight depends on it); any other change goes through the full state."""
    keys = ["tensor_model_parallel_size", "pipeline_model_parallel_size", "zero_stage"]
    if int(now["zero_stage"]) > 0:
        keys.append("data_parallel_size")
    return any(_saved_size(saved, k) != int(now[k]) for k in keys)


# What an older record (rebuilt from the saved arguments, or an import's) leaves out means the default layout.
_LAYOUT_DEFAULTS = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "data_parallel_size": 1,
                    "zero_stage": 0}


def _saved_size(saved: dict, key: str) -> int:
    value = saved.get(key)
    return _LAYOUT_DEFAULTS[key] if value is None else int(value)


# --------------------------------------------------------------------------- pipeline names
def pipeline_parts(config, pp: int, partition_method: str) -> List[int]:
    """DeepSpeed's stage boundaries for our layer list (``PipelineModule._partition_layers``, without
    building it): stage s holds pipeline layers parts[s] .. parts[s+1]-1."""
    import re

    from deepspeed.runtime import utils as ds_utils

    from megatron_slung.model.pipeline import gpt_layer_specs, pipeline_layer_parameter_counts

    specs = gpt_layer_specs(config)
    method = {"uniform": "type:TransformerLayer"}.get(partition_method, partition_method).lower()
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(specs), num_parts=pp)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=pipeline_layer_parameter_counts(config), num_parts=pp)
    if method.startswith("type:"):
        regex = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if regex.search(getattr(getattr(s, "typename", None), "__name__", "")) else 0 for s in specs]
        return ds_utils.partition_balanced(weights=weights, num_parts=pp)
    raise ReshardError(f"--pipeline-partition-method {partition_method!r}: stage boundaries unknown to the conversion")


def gpt_name(pipeline_name: str, prefixes) -> str:
    """A PipelineModule parameter name (``3.self_attention...``, ``tied_modules.embed.word_embeddings.weight``)
    as its GPTModel name (``GPTPipelineModule.model_state_dict``'s rule)."""
    head, _, rest = pipeline_name.partition(".")
    if head == "tied_modules":
        return "embedding." + rest.partition(".")[2]
    if head.isdigit():
        return prefixes[int(head)] + rest
    return pipeline_name


def _stage_parameter_order(tag_dir: str, config, tp_rank: int, parts: List[int], stage: int) -> Dict[str, torch.Tensor]:
    """The parameters of one pipeline stage in the order its module (and so its optimizer) has them, GPTModel
    names -> this TP rank's saved tensor: the tied embedding first (DeepSpeed registers tied modules before
    the layers), then the stage's layers in order."""
    from megatron_slung.model.gpt import pipeline_layer_prefixes

    prefixes = pipeline_layer_prefixes(config)
    tied = not config.untie_embeddings_and_output_weights
    layers = list(range(parts[stage], parts[stage + 1]))
    last = len(prefixes) - 1
    order: Dict[str, torch.Tensor] = {}
    has_tied = tied and (0 in layers or last in layers)
    if has_tied or 0 in layers:
        for k, v in _load(_layer_file(tag_dir, 0, tp_rank)).items():
            order["embedding." + k] = v
    for layer in layers:
        if layer == 0 or prefixes[layer] is None:
            continue
        for k, v in _load(_layer_file(tag_dir, layer, tp_rank)).items():
            order[prefixes[layer] + k] = v
    return order


def _layer_file(tag_dir: str, layer: int, tp_rank: int) -> str:
    return os.path.join(tag_dir, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")


def _mp_file(tag_dir: str, mp: int) -> str:
    return os.path.join(tag_dir, f"mp_rank_{mp:02d}_model_states.pt")


# --------------------------------------------------------------------------- reading one model-parallel rank
# Megatron's is_embedding_or_output_parameter, by GPTModel name (the position table is not one)
EMBEDDING_OR_OUTPUT = ("embedding.word_embeddings.weight", "output_layer.weight")


def _groups_by_decay(order: Dict[str, torch.Tensor], decoupled: bool = False) -> List[List[str]]:
    """``pretrain.build_optimizer``'s groups: matrices (weight decay) first, then (``decoupled``: the run had
    ``--decoupled-lr``) the word embedding and output layer, then 1-D parameters; an empty group is dropped."""
    special = [n for n in order if decoupled and n in EMBEDDING_OR_OUTPUT]
    decay = [n for n, t in order.items() if t.dim() >= 2 and n not in special]
    no_decay = [n for n, t in order.items() if t.dim() < 2 and n not in special]
    return [g for g in (decay, special, no_decay) if g]


def _step_of(state: dict) -> Optional[int]:
    for s in state.values():
        if "step" in s:
            return int(torch.as_tensor(s["step"]).item())
    return None


def _read_zero0(path: str, order: Dict[str, torch.Tensor], want_optimizer: bool, decoupled: bool = False):
    """ZeRO 0: the module's weights, and the torch optimizer's (fp32) or FP16_Optimizer's (bf16) state."""
    weights = {n: t.float() for n, t in order.items()}
    if not want_optimizer:
        return weights, None, None
    opt = _load(path).get("optimizer")
    if opt is None:
        raise ReshardError(f"{path} holds no optimizer state")
    groups = _groups_by_decay(order, decoupled)
    if "fp32_groups_flat" in opt:  # bf16 at ZeRO 0: DeepSpeed's FP16_Optimizer, one flat fp32 tensor per group
        base = opt["optimizer_state_dict"]
        moments = {m: {} for m in MOMENTS}
        for g, names in enumerate(groups):
            flat, offset = opt["fp32_groups_flat"][g], 0
            for n in names:
                shape, size = order[n].shape, order[n].numel()
                weights[n] = flat[offset:offset + size].view(shape).float()
                for m in MOMENTS:
                    moments[m][n] = base["state"][g][m][offset:offset + size].view(shape).float()
                offset += size
        return weights, moments, _step_of(base["state"])
    # bf16 at ZeRO 0 with a torch optimizer: DeepSpeed's FP16_UnfusedOptimizer, an fp32 copy per parameter
    # (``fp32_groups``) that the torch optimizer steps; else the torch optimizer's own state dict (fp32)
    masters = opt.get("fp32_groups")
    if masters is not None:
        opt = opt["optimizer_state_dict"]
    if "state" not in opt or "param_groups" not in opt:
        raise ReshardError(f"{path}: an optimizer state this conversion does not know (keys {sorted(opt)[:6]})")
    saved_groups = [g["params"] for g in opt["param_groups"]]
    if [len(g) for g in saved_groups] != [len(g) for g in groups]:
        raise ReshardError(f"{path}: the optimizer has groups of {[len(g) for g in saved_groups]} parameters, the "
                           f"model's stage {[len(g) for g in groups]}")
    moments = {m: {} for m in MOMENTS}
    for g, (names, ids) in enumerate(zip(groups, saved_groups)):
        for j, (n, i) in enumerate(zip(names, ids)):
            if masters is not None:
                weights[n] = masters[g][j].float()
            s = opt["state"].get(i)
            if s is None:  # never stepped: zero moments, as Adam starts
                s = {m: torch.zeros_like(order[n], dtype=torch.float32) for m in MOMENTS}
            if tuple(s["exp_avg"].shape) != tuple(order[n].shape):
                raise ReshardError(f"{path}: optimizer state {i} has shape {tuple(s['exp_avg'].shape)}, parameter {n} "
                                   f"{tuple(order[n].shape)}")
            for m in MOMENTS:
                moments[m][n] = s[m].float()
    return weights, moments, _step_of(opt["state"])


def _zero_files(tag_dir: str, mp: int, kind: str) -> List[str]:
    files = []
    for dp in range(10**6):
        found = glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_{dp}_mp_rank_{mp:02d}_{kind}_states.pt"))
        if not found:
            return files
        files.append(found[0])
    return files


def _read_zero12(tag_dir: str, mp: int, shapes: Dict[str, torch.Size], to_gpt, want_optimizer: bool):
    """ZeRO 1/2 and DeepSpeed's bf16 optimizer: per DP rank a flat fp32 partition per group, the moments alike,
    and which fragment of it each parameter is (``param_slice_mappings``); a parameter is its fragments in DP
    rank order."""
    files = _zero_files(tag_dir, mp, "optim")
    if not files:
        raise ReshardError(f"{tag_dir}: no zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt files")
    pieces = {key: {} for key in ("weight",) + MOMENTS}
    step = None
    for path in files:
        sd = _load(path)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]["state"]
        step = _step_of(base) if step is None else step
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            sources = {"weight": sd["single_partition_of_fp32_groups"][g]}
            if want_optimizer:
                sources.update({m: base[g][m] for m in MOMENTS})
            for name, frag in mapping.items():
                for key, flat in sources.items():
                    pieces[key].setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    out = {key: {} for key in pieces}
    for key, by_name in pieces.items():
        for name, parts in by_name.items():
            if name not in shapes:
                raise ReshardError(f"{tag_dir}: {name} is in the optimizer files but not in param_shapes")
            out[key][to_gpt(name)] = torch.cat(parts).view(shapes[name]).float()
    moments = {m: out[m] for m in MOMENTS} if want_optimizer else None
    return out["weight"], moments, step


def _read_zero3(tag_dir: str, mp: int, to_gpt, want_optimizer: bool):
    """ZeRO 3: each parameter split evenly over the DP ranks (the last padded), the partitions of a group
    concatenated in ``param_shapes`` order, in every rank's flat fp32 group and moments."""
    models, optims = _zero_files(tag_dir, mp, "model"), _zero_files(tag_dir, mp, "optim")
    if not optims or len(models) != len(optims):
        raise ReshardError(f"{tag_dir}: ZeRO 3 files of model-parallel rank {mp} are incomplete")
    group_shapes = _load(models[0])["param_shapes"]
    sds = [_load(p)["optimizer_state_dict"] for p in optims]
    world = len(sds)
    weights, moments = {}, {m: {} for m in MOMENTS}
    for g, shapes in enumerate(group_shapes):
        sources = [("weight", [sd["fp32_flat_groups"][g] for sd in sds])]
        if want_optimizer:
            sources += [(m, [sd["optimizer_state_dict"]["state"][g][m] for sd in sds]) for m in MOMENTS]
        offset = 0
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            part = -(-numel // world)
            for key, flats in sources:
                full = torch.cat([f.narrow(0, offset, part) for f in flats])[:numel].view(shape).float()
                (weights if key == "weight" else moments[key])[to_gpt(name)] = full
            offset += part
    step = _step_of(sds[0]["optimizer_state_dict"]["state"])
    return weights, (moments if want_optimizer else None), step


# --------------------------------------------------------------------------- the whole checkpoint
def read_full_state(ckpt_dir: str, config, saved_layout: dict, partition_method: str = "uniform", *,
                    optimizer: bool = True, decoupled_lr: bool = False) -> FullState:
    """Every model-parallel rank's files of ``ckpt_dir`` (saved at ``saved_layout``) as one full state.
    ``optimizer`` False: the weights only (the module's, or ZeRO 3's fp32 partitions). ``decoupled_lr``: the
    run that saved it had ``--decoupled-lr`` (one more optimizer group, which ZeRO 0's files hold by position)."""
    from megatron_slung.model.gpt import pipeline_layer_prefixes, tensor_parallel_layout

    tp, pp = (_saved_size(saved_layout, "tensor_model_parallel_size"),
              _saved_size(saved_layout, "pipeline_model_parallel_size"))
    stage = _saved_size(saved_layout, "zero_stage")
    prefixes = pipeline_layer_prefixes(config)
    if pp > 1:
        def to_gpt(n):
            return gpt_name(n, prefixes)
    else:
        def to_gpt(n):
            return n[len("module."):] if n.startswith("module.") else n
    parts = pipeline_parts(config, pp, partition_method) if pp > 1 else None
    # per TP rank: GPTModel name -> tensor, over all stages (the tied embedding's copy on the last stage is the
    # first stage's: DeepSpeed keeps them equal)
    shards = [{key: {} for key in ("weight",) + MOMENTS} for _ in range(tp)]
    steps = []
    for p in range(pp):
        for t in range(tp):
            mp = p * tp + t
            if stage == 3:
                w, mom, step = _read_zero3(ckpt_dir, mp, to_gpt, optimizer)
            elif stage == 0 or not optimizer:
                if pp > 1:
                    order = _stage_parameter_order(ckpt_dir, config, t, parts, p)
                else:
                    sd = _load(_mp_file(ckpt_dir, mp))
                    module = sd.get("module")
                    if not isinstance(module, dict):
                        raise ReshardError(f"{_mp_file(ckpt_dir, mp)}: no 'module' state dict")
                    buffers = set(sd.get("buffer_names") or ())
                    order = {to_gpt(k): v for k, v in module.items() if k not in buffers}
                w, mom, step = _read_zero0(_mp_file(ckpt_dir, mp), order, optimizer and stage == 0, decoupled_lr)
            else:
                shapes = {}
                for group in _load(_mp_file(ckpt_dir, mp))["param_shapes"]:
                    shapes.update(group)
                w, mom, step = _read_zero12(ckpt_dir, mp, shapes, to_gpt, optimizer)
            steps.append(step)
            sources = {"weight": w, **(mom or {})}
            for key, tensors in sources.items():
                for name, tensor in tensors.items():
                    shards[t][key].setdefault(name, tensor)
    layout_rules = tensor_parallel_layout(config)
    full = {key: {} for key in ("weight",) + MOMENTS}
    for key in full:
        if not shards[0][key]:
            continue
        names = set(shards[0][key])
        if names != set(layout_rules):
            missing, unexpected = sorted(set(layout_rules) - names)[:4], sorted(names - set(layout_rules))[:4]
            raise ReshardError(f"{ckpt_dir}: the saved parameters do not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
        for name, (dim, fused) in layout_rules.items():
            pieces = [s[key][name] for s in shards]
            full[key][name] = pieces[0] if dim is None else merge_tensor_parallel_shards(pieces, dim, fused)
    have_moments = optimizer and bool(full["exp_avg"])
    known = [s for s in steps if s is not None]
    return FullState(weights=full["weight"], moments={m: full[m] for m in MOMENTS} if have_moments else None,
                     step=max(known) if known and have_moments else None)


# --------------------------------------------------------------------------- into an engine at the new layout
def _local_parameters(engine, config) -> List[tuple]:
    """(GPTModel name, parameter) of this rank's module; a pipeline's names translated."""
    from megatron_slung.model.gpt import pipeline_layer_prefixes

    module = engine.module
    pipeline = hasattr(module, "model_state_dict")
    prefixes = pipeline_layer_prefixes(config)
    return [(gpt_name(n, prefixes) if pipeline else n, p) for n, p in module.named_parameters()]


def apply_full_state(engine, config, full: FullState, *, optimizer: bool = True) -> None:
    """Put this rank's slices of ``full`` into ``engine`` (built at the new layout): the module's weights, the
    fp32 master weights, and (``optimizer``) Adam's moments and step. Collective at ZeRO 3 (gathers nothing,
    but every rank must take part in the same order)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron_slung.model.gpt import tensor_parallel_layout
    from megatron_slung.parallel import state

    tp, tp_rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
    rules = tensor_parallel_layout(config)
    with_moments = optimizer and full.moments is not None

    def local(tensor, name):
        dim, fused = rules[name]
        return tensor if dim is None else split_for_tensor_parallel(tensor, tp, tp_rank, dim, fused)

    wrapper = engine.optimizer
    zero = engine.zero_optimization_stage()
    # ZeRO 0: the torch optimizer steps the parameters themselves (fp32), or an fp32 copy of each
    # (bf16: DeepSpeed's FP16_UnfusedOptimizer, ``fp32_groups``); ``master_of`` finds the tensor it steps.
    torch_optimizer, master_of = None, {}
    if not zero and not hasattr(wrapper, "fp32_groups_flat"):
        torch_optimizer = wrapper if isinstance(wrapper, torch.optim.Optimizer) else wrapper.optimizer
        if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
            master_of = {id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                         for lp, hp in zip(lps, hps)}
        while not isinstance(torch_optimizer, torch.optim.Optimizer) and hasattr(torch_optimizer, "optimizer"):
            torch_optimizer = torch_optimizer.optimizer
    if with_moments and torch_optimizer is None and zero:
        _create_flat_states(wrapper, full.step)
    with torch.no_grad():
        for name, param in _local_parameters(engine, config):
            if name not in full.weights:
                raise ReshardError(f"the checkpoint has no parameter {name}")
            weight = local(full.weights[name], name)
            if hasattr(param, "ds_id"):  # ZeRO 3: this rank's partition of the parameter, padded at the end
                part = param.ds_tensor
                rank = torch.distributed.get_rank(group=param.ds_process_group)
                flat = torch.nn.functional.pad(weight.flatten(), (0, part.numel() * (rank + 1) - weight.numel()))
                part.data.copy_(flat[part.numel() * rank:part.numel() * (rank + 1)].to(part.dtype))
            else:
                if tuple(param.shape) != tuple(weight.shape):
                    raise ReshardError(f"{name}: the checkpoint's slice has shape {tuple(weight.shape)}, this rank's "
                                       f"parameter {tuple(param.shape)}")
                param.data.copy_(weight.to(param.dtype))
            master = master_of.get(id(param), param)
            if master is not param:
                master.data.copy_(weight.to(master.device, master.dtype))
            safe_set_full_fp32_param(param, weight.to(param.device))
            if with_moments:
                moments = {m: local(full.moments[m][name], name).to(param.device) for m in MOMENTS}
                if torch_optimizer is not None:  # ZeRO 0, fp32: the torch optimizer's own per-parameter state
                    step_device = param.device if torch_optimizer.defaults.get("fused") else "cpu"
                    torch_optimizer.state[master] = {"step": torch.tensor(float(full.step), device=step_device),
                                                    **{m: v.clone() for m, v in moments.items()}}
                else:
                    for m, v in moments.items():
                        safe_set_full_optimizer_state(param, v, m)
        if hasattr(wrapper, "fp32_groups_flat") and not zero:  # bf16 at ZeRO 0 (FP16_Optimizer): flat fp32 groups
            _apply_fp16_optimizer(wrapper, full if with_moments else None, local, _local_parameters(engine, config))
        if with_moments and torch_optimizer is None:  # the flat groups' step count
            base = getattr(wrapper, "optimizer", wrapper)
            for s in base.state.values():
                if "step" in s:
                    s["step"] = torch.full_like(torch.as_tensor(s["step"]), float(full.step)) \
                        if torch.is_tensor(s["step"]) else full.step


def _create_flat_states(wrapper, step: int) -> None:
    """Adam's state of each flat fp32 partition, made as torch's AdamW makes it at its first step (DeepSpeed's
    ZeRO optimizers create it lazily, and link each parameter's fragment of it after), so that the moments
    can be written before any step."""
    base = wrapper.optimizer
    # the tensors the torch optimizer steps: ZeRO 3 swaps its sub-groups into param_groups one at a time
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(wrapper, attr, None)
        if flats is not None:
            break
    else:
        flats = [p for group in base.param_groups for p in group["params"]]
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for flat in flats:
        state = base.state[flat]
        state.setdefault("step", torch.tensor(float(step), device=flat.device if on_device else "cpu"))
        for m in MOMENTS:
            state.setdefault(m, torch.zeros_like(flat, memory_format=torch.preserve_format))
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1-2, bf16: link the fragments now
        wrapper._lazy_init_hp_params_optimizer_state()


def _apply_fp16_optimizer(wrapper, full: Optional[FullState], local, named) -> None:
    """DeepSpeed's FP16_Optimizer (bf16 at ZeRO 0): each group's fp32 master weights and moments are one flat
    tensor holding the group's parameters in order."""
    by_param = {id(p): n for n, p in named}
    base = wrapper.optimizer
    for g, params in enumerate(wrapper.fp16_groups):
        flat, offset = wrapper.fp32_groups_flat[g], 0
        st = base.state.get(flat)
        for p in params:
            name, size = by_param[id(p)], p.numel()
            value = local(full.weights[name], name) if full else p.float()
            flat.data[offset:offset + size].copy_(value.flatten())
            if full is not None:
                if not st:
                    st = base.state[flat] = {"step": torch.tensor(0.0),
                                             **{m: torch.zeros_like(flat) for m in MOMENTS}}
                for m in MOMENTS:
                    st[m][offset:offset + size].copy_(local(full.moments[m][name], name).flatten())
            offset += size
