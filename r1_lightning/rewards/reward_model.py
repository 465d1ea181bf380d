"""A neural reward: a sequence classifier with one output scores prompt + completion.

DeepSeek-R1's general-purpose RL stage scores helpfulness and harmlessness with reward
models (https://arxiv.org/abs/2501.12948, §2.3.4); rule rewards cannot. Any
`AutoModelForSequenceClassification` directory with `num_labels == 1` works (e.g. a
Skywork or an RLHFlow reward model saved locally).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from r1_lightning.errors import ConfigError
from r1_lightning.policy import DTYPES, load_tokenizer
from r1_lightning.rewards.base import Reward


class RewardModel(Reward):
    """Score each completion with a frozen reward model: its single logit on prompt + completion.

    The text scored is the chat rendered with the reward model's own chat template (the prompt's
    messages, or the prompt string as a user message, then the completion as the assistant's
    message), or plain `prompt + completion` when the tokenizer has no template. The model is
    loaded at the first call, frozen (`eval()`, no gradients), onto the policy's device: under
    Lightning that is the rank's current CUDA device, or the CPU. Completions are scored in
    batches of `batch_size`, padded; the model finds each row's last real token itself.

    Args:
        model_name_or_path: A local directory with an `AutoModelForSequenceClassification` of
            one label and its tokenizer.
        batch_size: Texts per forward pass.
        max_length: Keep at most this many tokens of each text, cut from the left (the end of
            the completion, where the answer is, stays); None: no limit.
        dtype: `auto`, `float32`, `bfloat16` or `float16`.
        device: Where the model runs; None: the current CUDA device if CUDA is available, else CPU.
        trust_remote_code: Allow model code from the directory.
        name: The reward's name in `train/rewards/<name>` (default `reward_model`).

    Example (YAML, under `model.init_args.rewards`):

        - class_path: r1_lightning.rewards.RewardModel
          init_args: {model_name_or_path: /models/my-reward-model, batch_size: 16}
    """

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 16,
        max_length: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        name: str = "reward_model",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"RewardModel: batch_size={batch_size} must be >= 1")
        if dtype not in DTYPES:
            raise ConfigError(f"RewardModel: dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        self.model_name_or_path = model_name_or_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.name = name
        self.model: torch.nn.Module | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def load(self) -> None:
        """Load the tokenizer and the frozen model (done by the first call)."""
        option = "RewardModel.model_name_or_path"
        self.tokenizer = load_tokenizer(self.model_name_or_path, self.trust_remote_code, option=option)
        self.tokenizer.truncation_side = "left"
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_name_or_path, dtype=DTYPES[self.dtype], trust_remote_code=self.trust_remote_code
        )
        if model.config.num_labels != 1:
            raise ConfigError(
                f"{option}={self.model_name_or_path!r}: a reward model has one output label, "
                f"this one has {model.config.num_labels}"
            )
        if model.config.pad_token_id is None:  # needed to find each padded row's last token
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self._device()).eval().requires_grad_(False)

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def text(self, prompt: str | list[dict[str, str]], completion: str) -> str:
        """The text scored for one (prompt, completion) pair."""
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        prompt_text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return prompt_text + completion

    @torch.no_grad()
    def __call__(self, completions: list[str], *, prompts: list, **columns: Any) -> list[float | None]:
        if self.model is None:
            self.load()
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        scores: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                add_special_tokens=not self.tokenizer.chat_template,  # a chat template already holds its BOS
                truncation=self.max_length is not None, max_length=self.max_length,
            ).to(device)
            logits = self.model(**batch).logits  # [b, 1]
            scores.extend(logits[:, 0].float().tolist())
        return scores

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["model"], state["tokenizer"] = None, None  # a copy (checkpoint, spawned rank) loads its own
        return state
