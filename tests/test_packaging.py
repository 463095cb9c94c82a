"""What a pip install brings: the fit configs inside the package (`fit --config tiny/finetune` from any
directory, `mistral-lightning configs` to copy them out), and tokenizers by name (`mistral-v1`, `mistral-v3`,
`tekken`, ...) rather than a path into mistral-common.

References: the repository's own configs/ files, a wheel built from a copy of the sources by pip, and
mistral-common's MistralTokenizer.v1()/v2()/v3()/v7() constructors for the names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_lightning.cli import main as cli_main
from mistral_lightning.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def source_configs() -> dict[str, Path]:
    """The repository's configs/ files by name (tiny/finetune), read when a test runs."""
    root = REPO / "configs"
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in sorted(root.rglob("*.yaml"))}


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the sources, unpacked as `pip install --target` would lay it out."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mistral_lightning", "kernels", "callbacks", "configs", "benchmarks"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source / file)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root)]
    subprocess.run([*build, str(source)], check=True, capture_output=True)
    (wheel,) = root.glob("mistral_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root / "site")
    return root / "site"


@pytest.mark.processes
def test_the_wheel_ships_every_config(installed_wheel):
    shipped = installed_wheel / "mistral_lightning" / "configs"
    sources = source_configs()
    assert {p.relative_to(shipped).with_suffix("").as_posix() for p in shipped.rglob("*.yaml")} == set(
        sources
    )
    for name, path in sources.items():
        assert (shipped / f"{name}.yaml").read_bytes() == path.read_bytes()


@pytest.mark.processes
def test_the_installed_package_resolves_a_config_name_from_any_directory(installed_wheel, tmp_path):
    code = (
        "import sys, mistral_lightning; from mistral_lightning.cli.configs import resolve_config_argv; "
        "print(mistral_lightning.__file__); print(resolve_config_argv(['fit', '--config', 'tiny/finetune'])[2]); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed_wheel)},
        capture_output=True,
        text=True,
        check=True,
    )
    package, config, torch_imported = result.stdout.split()
    assert torch_imported == "False"  # resolving a name stays as light as `configs --help`
    assert Path(package).is_relative_to(installed_wheel)  # the wheel's copy, not the source tree
    assert Path(config) == installed_wheel / "mistral_lightning" / "configs" / "tiny" / "finetune.yaml"


def test_fit_takes_a_shipped_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    with pytest.raises(SystemExit) as exited:  # LightningCLI exits after printing
        cli_main(["fit", "--config", "tiny/finetune", "--print_config"])
    assert exited.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(source_configs()["tiny/finetune"].read_text())
    assert printed["trainer"]["max_steps"] == source["trainer"]["max_steps"]
    model_config = source["model"]["model_config"]
    assert {key: printed["model"]["model_config"][key] for key in model_config} == model_config
    assert printed["data"]["init_args"]["data_prefix"] == source["data"]["init_args"]["data_prefix"]


def test_every_spelling_of_the_config_option_takes_a_name(tmp_path, monkeypatch):
    from mistral_lightning.cli.configs import resolve_config_argv

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("trainer: {max_steps: 1}\n")
    argv = [
        "fit",
        "--config=tiny/finetune",
        "-c",
        "tiny/pretrain.yaml",
        "--config",
        "configs/tiny/finetune_tp2",
    ]
    resolved = resolve_config_argv([*argv, "--config", "mine.yaml", "--trainer.max_steps", "tiny/pretrain"])
    sources = source_configs()
    assert Path(resolved[1].removeprefix("--config=")).read_bytes() == sources["tiny/finetune"].read_bytes()
    assert Path(resolved[3]).read_bytes() == sources["tiny/pretrain"].read_bytes()
    assert Path(resolved[5]).read_bytes() == sources["tiny/finetune_tp2"].read_bytes()
    assert resolved[6:] == [
        "--config",
        "mine.yaml",
        "--trainer.max_steps",
        "tiny/pretrain",
    ]  # files, other options


def test_an_unknown_config_name_is_one_line_naming_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["fit", "--config", "tiny/finetun"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--config tiny/finetun" in error and "tiny/finetune," in error


def test_configs_command_lists_and_copies_them_out_never_over_a_users_file(tmp_path, capsys):
    assert cli_main(["configs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(source_configs())

    out = tmp_path / "mine"
    assert cli_main(["configs", "--out", str(out)]) == 0
    for name, path in source_configs().items():
        assert (out / f"{name}.yaml").read_bytes() == path.read_bytes()

    edited = out / "tiny" / "finetune.yaml"
    edited.write_text("# my own edits\n")
    (out / "tiny" / "pretrain.yaml").unlink()
    capsys.readouterr()
    assert cli_main(["configs", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(edited) in error
    assert edited.read_text() == "# my own edits\n"
    assert not (out / "tiny" / "pretrain.yaml").exists()  # refused before writing anything


MISTRAL_COMMON = {
    "mistral-v1": MistralTokenizer.v1,
    "mistral-v2": MistralTokenizer.v2,
    "mistral-v3": MistralTokenizer.v3,
    "mistral-v7": MistralTokenizer.v7,
    "tekken": lambda: MistralTokenizer.v3(is_tekken=True),
}


@pytest.mark.parametrize("name", sorted(MISTRAL_COMMON))
def test_a_tokenizer_name_is_mistral_commons_tokenizer_of_that_version(name):
    reference = MISTRAL_COMMON[name]().instruct_tokenizer.tokenizer
    ours = Tokenizer(name)
    text = "Hello world, 你好 🙂"
    assert ours.encode(text, bos=True, eos=True) == reference.encode(text, bos=True, eos=True)
    assert ours.vocab_size == reference.n_words
    assert ours.chat_format.startswith(f"mistral-common {reference.version.value} ")


def test_a_path_that_exists_wins_over_a_tokenizer_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mistral-v1").mkdir()
    shutil.copy(Tokenizer("mistral-v3").path, tmp_path / "mistral-v1" / "tokenizer.model.v3")
    assert Tokenizer("mistral-v1").vocab_size == 32768  # the folder's v3 file, not the shipped v1


def test_preprocess_takes_a_tokenizer_name(tmp_path):
    from mistral_lightning.data.indexed import IndexedDataset

    text = "The packaged tokenizers need no path."
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": text}) + "\n")
    prefix = tmp_path / "out" / "rows"
    argv = ["preprocess", "--input", str(tmp_path / "rows.jsonl"), "--output-prefix", str(prefix)]
    assert cli_main([*argv, "--tokenizer-model", "mistral-v3", "--append-eod"]) == 0
    reference = MistralTokenizer.v3().instruct_tokenizer.tokenizer
    written = IndexedDataset(f"{prefix}_text_document").get(0).tolist()
    assert written == reference.encode(text, bos=True, eos=True)
