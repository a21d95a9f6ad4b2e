"""Command-line values checked against the type of the value they replace.

Hydra reads `model.optimizer.lr=abc` as the string "abc" and lets it through; the error then comes
from deep inside torch (`'<=' not supported between 'float' and 'str'`) without naming the key.
Here each `key=value` whose value Hydra read as text is compared with the value the configs give
that key without the override: text where the configs have a number or true/false is a user error
that names the key, the value and what was expected.
"""

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError


def check_overrides(cfg: DictConfig) -> None:
    """Raise ConfigError for the first text override of a numeric or boolean config value.

    A no-op outside a Hydra run (the Python API, configs composed in tests without overrides)."""
    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return
    hydra_cfg = HydraConfig.get()
    given = list(hydra_cfg.overrides.task)
    parsed = OverridesParser.create().parse_overrides(given)
    # Only plain `key=value` overrides of keys that hold text now; group choices (`model=clip`),
    # additions (`+key=`) and deletions (`~key`) are Hydra's to check.
    texts = {
        o.input_line: (o.key_or_group, o.value())
        for o in parsed
        if not o.is_add()
        and not o.is_delete()
        and not o.is_force_add()
        and isinstance(o.value(), str)
        and isinstance(OmegaConf.select(cfg, o.key_or_group, default=None), str)
    }
    if not texts:
        return
    kept = [line for line in given if line not in texts]
    defaults = compose(hydra_cfg.job.config_name, overrides=kept)
    for key, value in texts.values():
        default = OmegaConf.select(defaults, key, default=None, throw_on_resolution_failure=False)
        if isinstance(default, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false (the default is {str(default).lower()})")
        if isinstance(default, int | float):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ConfigError(f"{key}={value!r}: expected {kind} (the default is {default})")
