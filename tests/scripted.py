"""Scripted assistant turns for generation tests: a random tiny model writes the tokens a test needs.

``ScriptedTurns`` is a transformers ``LogitsProcessor``: for a prompt it recognises (by its
token ids), it forces the first tokens of given assistant turns; the model decides the rest.
Both generation paths pass it the full token history, so both are scripted alike.
"""

from transformers import LogitsProcessor, LogitsProcessorList

from vpt_plugin.conversation import collate_prompts, encode_conversation


class ScriptedTurns(LogitsProcessor):
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.scripts = []  # (prompt ids, {turn number: token ids})

    def add(self, prompt_ids: list[int], turns: dict[int, str]) -> None:
        encoded = {turn: self.tokenizer.encode(text, add_special_tokens=False) for turn, text in turns.items()}
        self.scripts.append((prompt_ids, encoded))

    def __call__(self, input_ids, scores):
        for b, row in enumerate(input_ids.tolist()):
            while row and row[0] == self.tokenizer.pad_token_id:
                row = row[1:]
            turns = next((t for prompt, t in self.scripts if row[: len(prompt)] == prompt), {})
            starts = [i + len(self.header) for i in range(len(row)) if row[i : i + len(self.header)] == self.header]
            script = turns.get(len(starts) - 1, [])
            step = len(row) - starts[-1]
            if step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
        return scores

    def as_list(self) -> LogitsProcessorList:
        return LogitsProcessorList([self])


def prompt_batch(processor, config, questions: list[str], images: list) -> dict:
    """Left-padded generation inputs for one question (with ``<image>`` when it has an image) per row."""
    encoded = []
    for question, image in zip(questions, images):
        content = ("<image>" if image is not None else "") + question
        messages = [{"role": "user", "content": content}]
        encoded.append(encode_conversation(processor, config, messages, images=[image] if image else None,
                                           add_generation_prompt=True))
    batch = collate_prompts(encoded, processor.tokenizer.pad_token_id)
    batch["prompts"] = [e["input_ids"] for e in encoded]
    batch["image_token_id"] = config.image_token_id
    return batch
