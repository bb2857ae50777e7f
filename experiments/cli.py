"""Command-line pieces shared by experiments/train.py, sweep.py and bench.py.

- Config paths work from any directory: `--config=configs/mqar.py` is read relative to the current
  directory when that file exists there, else relative to the directory that holds `configs/` and
  `experiments/` (the checkout, or site-packages when installed).
- Configuration errors (a config argument, a missing config file, an override of a field the config
  does not have or with a value of the wrong type, a value that fails validation) print one line,
  `attnjax: config error: <message>`, to stderr and exit with status 2: no traceback.
- `--help` lists the configs (their docstring's first sentence and `get_config` argument) and the
  fields of the chosen config (`--config=... --help`) or of every training config.

Imports nothing of attnjax: flags are parsed before jax.distributed.initialize.
"""

from __future__ import annotations

import ast
from contextlib import nullcontext
import importlib.util
import os
import re
import sys
import textwrap
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import flags
import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = "configs"
EXIT_CONFIG_ERROR = 2
HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull",
              "--helpxml", "-helpxml")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_ARG = re.compile(r"^--?config(=|$)")
_NOT_CONFIGS = ("__init__.py", "common.py")


def fail(message: Any, kind: str = "config error") -> NoReturn:
  """Prints `attnjax: <kind>: <message>` as one line to stderr and exits with status 2."""
  print(f"attnjax: {kind}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(EXIT_CONFIG_ERROR)


def list_configs(subdir: str = "") -> list[tuple[str, str, str]]:
  """[(path as typed, e.g. "configs/mqar.py", docstring's first sentence, get_config's argument
  doc)] for the config files of configs/<subdir> (neither `__init__` nor `common`)."""
  directory = os.path.join(ROOT, CONFIGS, subdir)
  out = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
    if not name.endswith(".py") or name in _NOT_CONFIGS:
      continue
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    arg_doc = ""
    for node in tree.body:
      if isinstance(node, ast.FunctionDef) and node.name == "get_config":
        arg_doc = " ".join((ast.get_docstring(node) or "").split()).replace("`arg`: ", "")
        arg_doc = arg_doc.rstrip(".").strip('"')
    out.append(("/".join(filter(None, (CONFIGS, subdir, name))),
                first_sentence(ast.get_docstring(tree) or ""), arg_doc))
  return out


def first_sentence(doc: str) -> str:
  """The first sentence of a docstring's first paragraph, on one line."""
  paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
  match = re.search(r"\.(\s|$)", paragraph)
  return paragraph[:match.start() + 1] if match else paragraph


def resolve_config_path(path: str, subdir: str = "") -> str:
  """`path` when it exists (relative to the current directory), else the same relative path under
  ROOT, so `configs/mqar.py` works from any directory.

  Raises:
    ValueError: neither exists; the message lists the configs of configs/<subdir>.
  """
  if not path:
    raise ValueError("--config: a config file is needed, e.g. --config=configs/mqar.py")
  if os.path.isfile(path):
    return path
  if not os.path.isabs(path) and os.path.isfile(os.path.join(ROOT, path)):
    return os.path.join(ROOT, path)
  known = ", ".join(p for p, _, _ in list_configs(subdir))
  places = " and ".join(repr(d) for d in dict.fromkeys((os.getcwd(), ROOT)))
  raise ValueError(f"--config: no config file {path!r} (looked in {places}); the configs are: "
                   f"{known}")


def load_config(spec: str, subdir: str = "") -> Any:
  """`path/to/config.py[:arg]` -> its `get_config(arg)` (`get_config()` without an argument).

  Raises:
    ValueError: no such file, or the config rejects `arg` (the message names the argument).
  """
  path, _, arg = spec.partition(":")
  path = resolve_config_path(path, subdir)
  name = "attnjax_config_" + re.sub(r"\W", "_", os.path.basename(path).removesuffix(".py"))
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _config_value(argv: Sequence[str]) -> tuple[int, Optional[str]]:
  """(index in argv, value) of the --config flag (`--config=v` or `--config v`); (-1, None)."""
  for i, arg in enumerate(argv):
    if _CONFIG_ARG.match(arg):
      if "=" in arg:
        return i, arg.split("=", 1)[1]
      return i, argv[i + 1] if i + 1 < len(argv) else None
  return -1, None


def check_overrides(config: Any, argv: Sequence[str]):
  """Each `--config.a.b=v` of argv names a field of `config` that the command line can set.

  Raises:
    ValueError: naming the override, the missing field and the fields that exist.
  """
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    dotted = match.group(1)
    node, where = config, "the config"
    for i, part in enumerate(parts := dotted.split(".")):
      if not isinstance(node, ml_collections.ConfigDict):
        break  # a list or tuple value: config_flags checks the rest
      if part not in node:
        parent = ".".join(parts[:i])
        hint = (f"; it is empty: set it whole, e.g. --config.{parent}='{{\"key\": value}}'"
                if not node.keys() else f"; {where} has {sorted(node.keys())}")
        raise ValueError(f"--config.{dotted}: no field {'.'.join(parts[:i + 1])!r}{hint}")
      if i == len(parts) - 1 and node[part] is None and node.get_type(part) is type(None):
        raise ValueError(f"--config.{dotted}: the field is None without a declared type, so the "
                         "command line cannot set it; set it in the config file (or declare it "
                         "there as ml_collections.config_dict.placeholder(<type>))")
      node, where = node[part], ".".join(parts[:i + 1])


def _short(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def fields_help(config: Any, title: str) -> str:
  """`title`, then each section of `config` with its fields (and values) on wrapped lines."""
  lines = [title]
  if not isinstance(config, ml_collections.ConfigDict):
    return ""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value.keys():
      body = ", ".join(f"{k}={_short(v)}" for k, v in value.items())
      lines.append(textwrap.fill(f"{key}: {body}", 100, initial_indent="  ",
                                 subsequent_indent="      ", break_on_hyphens=False))
    else:
      lines.append(textwrap.fill(f"{key} = {_short(value)}", 100, initial_indent="  ",
                                 subsequent_indent="      ", break_on_hyphens=False))
  return "\n".join(lines) + "\n"


def help_text(subdir: str, config: Any, config_name: Optional[str], fields_note: str) -> str:
  """The configs of configs/<subdir>, then the fields of `config` (the chosen one, or a default)."""
  lines = [f"\nConfigs (--config=<path>[:arg]; a path not found from the current directory is read "
           f"from {ROOT}):"]
  for path, summary, arg_doc in list_configs(subdir):
    lines.append(textwrap.fill(f"{path}: {summary}", 100, initial_indent="  ",
                               subsequent_indent="      "))
    if arg_doc:
      lines.append(textwrap.fill(f"arg: {arg_doc}", 100, initial_indent="      ",
                                 subsequent_indent="      "))
  what = f"of {config_name} (before any --config.* override)" if config_name else "(defaults)"
  if config is None:
    return "\n".join(lines) + "\n\n" + textwrap.fill(f"Fields: {fields_note}.", 100) + "\n"
  title = textwrap.fill(f"Fields {what}; {fields_note}:", 100, subsequent_indent="  ")
  return "\n".join(lines) + "\n\n" + fields_help(config, title)


def make_flags_parser(subdir: str = "", *, default_fields: Optional[Callable[[], Any]] = None,
                      fields_note: str = "") -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run`: resolves the --config path (see module docstring), loads
  the config and checks the overrides before absl parses the flags, turning every configuration
  error into one line (`fail`). With --help, the usage text lists the configs and the fields."""

  def parse(argv: list[str]) -> list[str]:
    argv = list(argv)
    wants_help = any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:])
    index, value = _config_value(argv)
    config, name = None, None
    if value is not None:
      path, sep, arg = value.partition(":")
      try:
        resolved = resolve_config_path(path, subdir)
        if "=" in argv[index]:
          argv[index] = f"{argv[index].split('=', 1)[0]}={resolved}{sep}{arg}"
        else:
          argv[index + 1] = f"{resolved}{sep}{arg}"
        config, name = load_config(value, subdir), value
        check_overrides(config, argv)
      except ValueError as e:
        if not wants_help:
          fail(e)
    if wants_help:
      main = sys.modules["__main__"]
      if config is None and default_fields is not None:
        config = default_fields()
      text = (main.__doc__ or "") + help_text(subdir, config, name, fields_note)
      # absl's usage() %-formats the docstring: escape every % so it prints as written.
      main.__doc__ = text.replace("%", "%%")
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      message = str(e)
      if "Traceback" in message:  # config_flags quotes the config's traceback: keep its last line
        fail(re.sub(r"^\w+: ", "", message.strip().splitlines()[-1].strip()))
      required = re.search(r"Flag --(\w+) must have a value other than None", message)
      if required:
        fail(f"--{required.group(1)} is required; --help lists the flags and the configs", "error")
      fail(message, "config error" if "--config" in message else "error")

  return parse


def apply_overrides(config, overrides):
  """Sets each `dotted.key: value` of `overrides` (ValueError naming the key if it does not
  exist)."""
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split(".")
    node = config
    for i, p in enumerate(parents):
      if p not in node:
        raise ValueError(f"override {dotted!r}: the config has no field "
                         f"{'.'.join(parents[:i + 1])!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"override {dotted!r}: the config has no field {leaf!r}")
    with node.unlocked() if hasattr(node, "unlocked") else nullcontext():
      node[leaf] = value
  return config
