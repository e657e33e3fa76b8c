"""Arguments of every recipe: the dataclasses (`toolkit.args.pretrain`, `toolkit.args.finetune`), one parser
(YAML + command-line overrides + range checks, `toolkit.args.parser`) and the defaults resolved in view of the
recipe (`toolkit.args.defaults`)."""

from toolkit.args.defaults import derive_settings, resolve_defaults
from toolkit.args.parser import RANGES, Range, check_ranges, parse, print_cached_help

__all__ = ["RANGES", "Range", "check_ranges", "derive_settings", "parse", "print_cached_help", "resolve_defaults"]
