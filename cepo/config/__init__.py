"""The training configuration, importing no torch: the schema (`schema`), the presets and the
offline default (`presets`), the command line and YAML files (`cli`), and ``--help`` (`help`).

``from cepo.config import TrainConfig, build_config`` is the usual entry; `check_machine` is the
one function that imports torch, and only when called.
"""

from cepo.config.cli import (
    apply_overrides,
    build_config,
    check_machine,
    from_yaml,
    load_yaml,
    option_types,
    parse_args,
    resolve_key,
    save_yaml,
)
from cepo.config.help import exit_if_help, field_docs, help_text
from cepo.config.presets import PRESETS, finalize, offline, paper, reference
from cepo.config.schema import (
    ALGOS,
    DEFAULT_EPS_W,
    DEFAULT_LAM_OFFSET,
    DEFAULT_LR,
    EXECUTION_ONLY,
    MAX_GRADER_S,
    MAX_SEED,
    MIN_TEMPERATURE,
    NEG_CHOICES,
    REFERENCE_THRESHOLD,
    RENAMED,
    AdapterConfig,
    AdvantageConfig,
    CheckpointConfig,
    ContrastConfig,
    DataConfig,
    LogConfig,
    ModelConfig,
    NegChoice,
    OptimConfig,
    PPOConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
    ValConfig,
    check_eps_w,
    flatten,
    to_dict,
    unflatten,
)
from cepo.errors import ConfigError

__all__ = [
    "ALGOS", "DEFAULT_EPS_W", "DEFAULT_LAM_OFFSET", "DEFAULT_LR", "EXECUTION_ONLY", "MAX_GRADER_S",
    "MAX_SEED", "MIN_TEMPERATURE", "NEG_CHOICES", "PRESETS", "REFERENCE_THRESHOLD", "RENAMED",
    "AdapterConfig", "AdvantageConfig", "CheckpointConfig", "ConfigError", "ContrastConfig",
    "DataConfig", "LogConfig", "ModelConfig", "NegChoice", "OptimConfig", "PPOConfig",
    "RolloutConfig", "TeacherConfig", "TrainConfig", "ValConfig", "apply_overrides",
    "build_config", "check_eps_w", "check_machine", "exit_if_help", "field_docs", "finalize",
    "flatten",
    "from_yaml", "help_text", "load_yaml", "offline", "option_types", "paper", "parse_args",
    "reference", "resolve_key", "save_yaml", "to_dict", "unflatten",
]
