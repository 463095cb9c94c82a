"""`mistral-lightning configs [--out DIR]`: the fit configs that ship inside the package, listed or copied out.

The repository's `configs/` folder installs as `mistral_lightning.configs` (pyproject.toml's package-dir),
so `fit --config tiny/finetune` works from any directory: `resolve_config_argv` turns a config name that
is not a file into the packaged file before LightningCLI parses the arguments.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from mistral_lightning.errors import UserError
from mistral_lightning.outputs import NewFile, user_path

CONFIG_OPTIONS = ("--config", "-c")


class ConfigNameError(UserError):
    """A `--config` that is neither a file nor the name of a packaged config."""


def packaged_configs_dir() -> Path:
    """The installed copy of `configs/` (a folder on disk: the package is never imported from a zip)."""
    return Path(str(resources.files("mistral_lightning.configs")))


def packaged_configs() -> dict[str, Path]:
    """Packaged configs by name: `tiny/finetune` -> .../mistral_lightning/configs/tiny/finetune.yaml."""
    root = packaged_configs_dir()
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in sorted(root.rglob("*.yaml"))}


def resolve_config(value: str) -> str:
    """`value` if it is a file (or inline YAML), else the packaged config it names (`tiny/finetune`,
    `tiny/finetune.yaml` or `configs/tiny/finetune.yaml`); a name nothing matches is refused in one line."""
    if Path(value).is_file() or any(mark in value for mark in ("\n", "{", ": ")):
        return value
    name = value.removesuffix(".yaml").removesuffix(".yml").removeprefix("configs/")
    configs = packaged_configs()
    if name in configs:
        return str(configs[name])
    raise ConfigNameError(
        f"--config {value}: no such file, nor a config shipped with mistral-lightning ({', '.join(configs)}); "
        "`mistral-lightning configs --out DIR` copies them out to edit"
    )


def resolve_config_argv(argv: list[str]) -> list[str]:
    """argv with every `--config NAME`, `--config=NAME` and `-c NAME` that names a packaged config resolved."""
    resolved, expects_config = [], False
    for argument in argv:
        if expects_config:
            argument, expects_config = resolve_config(argument), False
        elif argument in CONFIG_OPTIONS:
            expects_config = True
        elif argument.startswith("--config="):
            argument = "--config=" + resolve_config(argument.removeprefix("--config="))
        resolved.append(argument)
    return resolved


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def copy_configs(out: Path) -> list[Path]:
    """Copy the packaged configs under `out`, keeping their folders; refuses before writing anything if a
    file there already exists with other contents (identical files are left as they are)."""
    configs = packaged_configs()
    targets = {source: out / source.relative_to(packaged_configs_dir()) for source in configs.values()}
    for source, target in targets.items():
        if target.exists() and (not target.is_file() or target.read_bytes() != source.read_bytes()):
            raise UserError(
                f"--out {out}: {target} already exists and differs from the shipped "
                f"{target.relative_to(out)}; move it away or choose another --out (nothing was written)"
            )
    written = []
    for source, target in targets.items():
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed, so an interrupted copy leaves no half-written config.
        with NewFile(target) as stream:
            stream.write(source.read_bytes())
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mistral-lightning configs",
        description="List the fit configs shipped with mistral-lightning, or copy them out to edit. "
        "`fit --config NAME` (e.g. tiny/finetune) uses a shipped config from any directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=user_path, default=None, help="copy every config into this folder (NAME.yaml under it)"
    )
    args = parser.parse_args(argv)
    configs = packaged_configs()
    if args.out is None:
        width = max(len(name) for name in configs)
        for name, path in configs.items():
            print(f"{name:<{width}}  {_first_comment(path)}")
        return 0
    written = copy_configs(Path(args.out))
    print(f"{len(written)} configs written under {args.out} ({len(configs) - len(written)} already there)")
    return 0
