"""SambaFlow's compile and run arguments as pydantic v2 models: `CommonArgs`, `CompileArgs`, `RunArgs`.

SambaNova's modelzoo configures its apps with Hydra and validates the `samba_compile` and
`samba_run` sections with these models (`SambaConfig` in its `libs/common/samba_schema.py`). Every
key its configs and READMEs use is a field here; a key that is none of them is refused with the
nearest field names ("did you mean ...?"), as a misspelt knob must not pass silently.

Which fields take effect in this project: `output_folder`, `pef_name` (where compile writes),
`inference`, `data_parallel`, `world_size` (recorded, as `--data-parallel -ws`), `pef` (run).
`debug` and `verbose` are recorded. The rest tune SambaNova's RDU compiler (architecture, tiling,
placement, fusion rules, stochastic rounding, ...): accepted, recorded in the PEF, and listed in the
compile log in one line as having no effect (`rdu_only_settings`). None of them changes numerics.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sambaflow.app.rdu_settings import no_effect_line, rdu_only_given


class _Strict(BaseModel):
    """Unknown keys are refused naming the closest known ones."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError("; ".join(_unknown_message(cls, k) for k in unknown))
        return data


def _unknown_message(cls: type[BaseModel], key: Any) -> str:
    close = difflib.get_close_matches(str(key), list(cls.model_fields), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "check the spelling"
    return f"{cls.__name__} has no argument {key!r}: {hint} (known: {', '.join(sorted(cls.model_fields))})"


class CommonArgs(_Strict):
    """Arguments compile and run share (a run reads them back from the PEF's metadata)."""

    arch: str | None = Field(default=None, description="RDU architecture (sn10/sn20/sn30/sn40): no effect")
    target_sambaflow_version: str | None = Field(default=None, description="runtime version: no effect")
    n_chips: int = Field(default=1, description="RDUs a graph spans: no effect")
    num_tiles: int | None = Field(default=None, description="tiles per RDU: no effect")
    debug: bool = Field(default=False, description="debug output (recorded)")
    verbose: bool = Field(default=False, description="verbose output (recorded)")
    log_level: str | None = Field(default=None, description="logging level: no effect")
    log_dir: str | None = Field(default=None, description="log folder: no effect")


class CompileArgs(CommonArgs):
    """`samba_compile`: where the PEF goes, what it holds, and RDU compiler settings (no effect)."""

    output_folder: str | None = Field(default=None, description="PEF folder (default: out)")
    pef_name: str | None = Field(default=None, description="PEF name (default: the app's name)")
    inference: bool = Field(default=False, description="forward-only PEF")
    data_parallel: bool = Field(default=False, description="data-parallel compile (recorded)")
    world_size: int | None = Field(default=None, description="data-parallel replicas compiled for")
    # RDU compiler settings: accepted and recorded, no effect here
    compiler_mode: str | None = None
    optim_level: str | None = None
    o1_experimental_opts: bool | None = None
    optimization_rules: str | None = None
    use_o1_default_rules: bool | None = None
    enable_distribution_pass: bool | None = None
    weight_grad_reduce: str | None = None
    enable_safe_stochastic_rounding: bool | None = None
    enable_mixed_precision_ops: list[str] | None = None
    enable_multi_input_broadcast: bool | None = None
    tiling_accum: str | None = None
    use_air_ce: bool | None = None
    all_regions_hbm: bool | None = None
    hbm_auto_alloc: str | None = None
    compiler_configs_file: str | None = None
    enable_coe: bool | None = None
    enable_pcu_scaling: bool | None = None
    loop_conversion: bool | None = None
    optimize_concat_split: bool | None = None
    resources_scaling_factors: list[float] | None = None
    run_early_tp: bool | None = None
    skip_pnr_aware: bool | None = None
    enable_hypersection: bool | None = None
    mapping: str | None = None
    o0: bool | None = None
    o1: bool | None = None


class RunArgs(CommonArgs):
    """`samba_run`: the PEF to run."""

    pef: str | None = Field(default=None, description="the PEF file to run")
    reduce_on_rdu: bool | None = Field(default=None, description="all-reduce on the device: no effect")


def rdu_only_settings(args: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """The RDU compiler settings given a value: they are recorded and have no effect here."""
    return rdu_only_given(args.model_dump() if isinstance(args, BaseModel) else dict(args))


__all__ = ["CommonArgs", "CompileArgs", "RunArgs", "no_effect_line", "rdu_only_settings"]
