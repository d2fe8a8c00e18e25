"""SambaFlow's import path for the app argument parser; the work is in `sambaflow.app.args`."""

from sambaflow.app.args import parse_app_args, parse_yaml_to_args, positive_int

__all__ = ["parse_app_args", "parse_yaml_to_args", "positive_int"]
