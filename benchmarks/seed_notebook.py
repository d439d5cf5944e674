"""The seed notebook's data path and training step, kept verbatim in spirit as the baseline.

Each row is tokenized in ``__getitem__`` and padded to 128 tokens; the step feeds
``labels = input_ids`` (padding included in the loss), no attention mask, fp32, plain Adam, and
reads the loss every step (``loss.item()`` for the progress bar).
"""

from __future__ import annotations

from torch.utils.data import Dataset

SEED_MAX_LENGTH = 128


class SeedLanguageDataset(Dataset):
    def __init__(self, frame, tokenizer):
        self.labels = ["Name", "Symptoms"]
        self.data = frame[self.labels].to_dict(orient="records")
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        name = self.data[index][self.labels[0]]
        symptoms = self.data[index][self.labels[1]]
        text = f"{name} | {symptoms}"
        # encode_plus in the notebook; transformers 5 keeps only __call__, the same encoding.
        return self.tokenizer(text, return_tensors="pt", max_length=SEED_MAX_LENGTH,
                              padding="max_length", truncation=True)


def seed_step(model, optimizer, batch) -> float:
    optimizer.zero_grad()
    inputs = batch["input_ids"].squeeze(1)
    outputs = model(input_ids=inputs, labels=inputs.clone())
    loss = outputs.loss
    loss.backward()
    optimizer.step()
    return loss.item()
