"""RDU compiler settings: accepted from SambaNova's configs, recorded in the PEF, no effect here.

SambaNova's modelzoo passes its `samba_compile` section (`CompileArgs`) to `session.setup` and as
`config_dict` to `session.compile`. Of its keys only `output_folder`, `pef_name`, `inference`,
`data_parallel` and `world_size` act here (and `debug`/`verbose`, recorded); the rest tune the
RDU's compiler (architecture, tiling, placement, fusion rules, stochastic rounding, ...). They are
listed, once, in one line of the compile output and log as having had no effect.
"""

from __future__ import annotations

from typing import Any

#: `samba_compile` keys that act in this project (everything else there is RDU-only)
EFFECTIVE = frozenset(
    {"output_folder", "pef_name", "inference", "data_parallel", "world_size", "pef", "debug", "verbose"}
)

#: RDU-only keys of `CompileArgs` (samba/argconf/args.py), with the default that means "not given"
RDU_ONLY: dict[str, Any] = {
    "arch": None,
    "target_sambaflow_version": None,
    "n_chips": 1,
    "num_tiles": None,
    "log_level": None,
    "log_dir": None,
    "compiler_mode": None,
    "optim_level": None,
    "o1_experimental_opts": None,
    "optimization_rules": None,
    "use_o1_default_rules": None,
    "enable_distribution_pass": None,
    "weight_grad_reduce": None,
    "enable_safe_stochastic_rounding": None,
    "enable_mixed_precision_ops": None,
    "enable_multi_input_broadcast": None,
    "tiling_accum": None,
    "use_air_ce": None,
    "all_regions_hbm": None,
    "hbm_auto_alloc": None,
    "compiler_configs_file": None,
    "enable_coe": None,
    "enable_pcu_scaling": None,
    "loop_conversion": None,
    "optimize_concat_split": None,
    "resources_scaling_factors": None,
    "run_early_tp": None,
    "skip_pnr_aware": None,
    "enable_hypersection": None,
    "mapping": None,
    "o0": None,
    "o1": None,
    "reduce_on_rdu": None,
}


def rdu_only_given(config: dict[str, Any]) -> dict[str, Any]:
    """The RDU-only settings in `config` given a value other than their 'not given' default."""
    return {k: v for k, v in config.items() if k in RDU_ONLY and v is not None and v != RDU_ONLY[k]}


def no_effect_line(config: dict[str, Any], hints: dict[str, list[str]] | None = None) -> str | None:
    """One line naming the RDU-only settings given and the RDU compiler hints the model's code gave
    (`op_fusion` heuristics and plugins), or None when there are none."""
    given = rdu_only_given(config)
    parts = [f"{k}={v}" for k, v in given.items()]
    parts += [f"{kind}={values}" for kind, values in (hints or {}).items() if values]
    if not parts:
        return None
    return f"RDU compiler settings accepted and recorded, no effect here: {', '.join(parts)}"


def fusion_hints(scopes: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The heuristics and plugin names `op_fusion(..., heuristic=, plugins=)` scopes gave."""
    found: dict[str, list[str]] = {"fusion heuristics": [], "plugins": []}
    for hints in scopes.values():
        for kind, key in (("fusion heuristics", "heuristic"), ("plugins", "plugins")):
            for name in _names(hints.get(key)):
                if name not in found[kind]:
                    found[kind].append(name)
    return found


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    if isinstance(value, (list, tuple, set)):
        return [str(v) for v in value]
    return [str(value)]
