"""What README.md says about the code agrees with the code (numbers and file names that a
change to the code would otherwise leave stale)."""

import re
from pathlib import Path

from medlm.generate import MAX_BATCH_SEQUENCES

README = (Path(__file__).parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_the_bound_on_sequences_per_generate_call_is_the_codes():
    stated = re.findall(r"(\d+) sequences per model call", README)
    assert stated and all(int(number) == MAX_BATCH_SEQUENCES for number in stated)


def test_the_checkpoint_files_listed_are_those_a_lora_epoch_writes(tiny_model_dir, tmp_path,
                                                                    dataset_csv):
    from medlm.checkpoint import current_epoch_directory
    from medlm.data import load_disease_data
    from medlm.lora import add_lora
    from medlm.modeling import load_tokenizer_and_model
    from medlm.train import fit
    from tests.test_train import CPU, FP32, loaders, plain

    tokenizer, model = load_tokenizer_and_model(str(tiny_model_dir))
    train, validation = loaders(tokenizer, load_disease_data(str(dataset_csv), 40).frame)
    fit(add_lora(model, 2), train, validation, plain(epochs=1, progress=False), CPU, FP32,
        checkpoint_dir=str(tmp_path))
    written = {path.name for path in current_epoch_directory(tmp_path).iterdir()}
    resume = section("Interruptions and resume")
    listed = set(re.findall(r"`(\w+\.(?:safetensors|pt))`", resume))
    assert written <= listed, f"{written - listed} not in README's list"
    assert "adapters" in resume  # a LoRA run's model.safetensors holds the adapters alone
