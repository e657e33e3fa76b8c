"""Arguments of every recipe: the dataclasses (`toolkit.args.pretrain`, `toolkit.args.finetune`), one parser
(YAML + command-line overrides + range checks, `toolkit.args.parser`), the valid range of every numeric option of
every recipe and command (`toolkit.args.ranges`) and the defaults resolved in view of the recipe
(`toolkit.args.defaults`)."""

from toolkit.args.defaults import derive_settings, resolve_defaults, resolve_model_shape
from toolkit.args.parser import parse, print_cached_help
from toolkit.args.ranges import RANGES, Range, check_ranges

__all__ = ["RANGES", "Range", "check_ranges", "derive_settings", "parse", "print_cached_help", "resolve_defaults",
           "resolve_model_shape"]
