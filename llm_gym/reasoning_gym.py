"""``ReasoningGym``: a batched environment that feeds tokenized prompts to LLM agents.

Keeps the constructor of AgileRL's ``ReasoningGym`` (seed 001), so a script written for it runs
with only its imports changed. ``reset()`` returns a batch of prompts; ``step(completions)``
scores what the agent generated for them and returns the next batch with the rewards.

Answers can never cross splits: every issued batch keeps its own problems, per split, and
``step`` scores against the batch issued in the current mode (AgileRL scored training
completions against test answers after an evaluation: its issue #591).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from llm_gym.rubric import Rubric, Score
from llm_gym.template import ConversationTemplate, TemplateError

__all__ = ["ReasoningGym", "Prompt"]

logger = logging.getLogger(__name__)

Prompt = dict[str, Any]  # {"input_ids": LongTensor[1, L], "attention_mask": LongTensor[1, L], "text": str | None}


def _rows(data: Any, name: str) -> list[dict[str, Any]]:
    if data is None:
        raise ValueError(f"{name} is required")
    rows = data.to_list() if hasattr(data, "to_list") else [dict(r) for r in data]
    if not rows:
        raise ValueError(f"{name} is empty: give at least one problem")
    return rows


class ReasoningGym:
    """Batched prompts from a train and a test dataset, scored by a reward function.

    Args:
        train_dataset: Training problems: a ``datasets.Dataset`` or a sequence of dicts.
        test_dataset: Held-out problems, never used for training rewards.
        tokenizer: A Hugging Face tokenizer with a chat template. ``None`` serves prompts as chat
            messages only (``prompt["messages"]``, no ids), for policies that answer in text (an
            oracle, an API model); their completions are then given as strings.
        reward_fn: A :class:`~llm_gym.rubric.Rubric`, or a plain callable
            ``fn(completion, answer, question) -> float`` (seed 001), wrapped into a one-part rubric.
        conversation_template: Role/content messages with ``{column}`` placeholders; a final
            assistant message is a prefill the model continues.
        data_batch_size_per_gpu: Prompts per batch.
        accelerator: An ``accelerate.Accelerator``; with several processes each one takes its
            own shard of the data, all shards the same size (padded by wrapping around).
        return_raw_completions: Also return each prompt's text (``prompt["text"]``), as the
            vLLM backend needs.
        max_context_length: Drop problems whose *templated* prompt is longer (in tokens), with a
            warning saying how many.
        seed: Seed of the per-epoch shuffling of the training problems.
        correct_part: Name of the rubric part that means "right answer" (for accuracy metrics).
        validation_dataset: Optional validation problems (fitness for evolution), served by
            ``eval_mode("validation")``; disjoint from both other splits when built by :meth:`from_task`.
        eval_batch_size: Prompts per batch on the held-out splits (evaluation, fitness); default
            ``data_batch_size_per_gpu``. Decoding a small batch is bound by per-step overhead, so an
            evaluation in batches of 50 runs several times faster than in training-sized batches of 4.

    Raises:
        ValueError: empty data, bad batch size, or every problem filtered out.
        TemplateError: a placeholder names a column the data lacks.
    """

    def __init__(
        self,
        train_dataset: Any,
        test_dataset: Any,
        tokenizer: Any,
        reward_fn: Rubric | Callable[..., float],
        conversation_template: Sequence[Mapping[str, str]] | ConversationTemplate,
        data_batch_size_per_gpu: int = 8,
        accelerator: Any = None,
        return_raw_completions: bool = False,
        max_context_length: int | None = None,
        seed: int = 42,
        correct_part: str | None = None,
        validation_dataset: Any = None,
        eval_batch_size: int | None = None,
    ) -> None:
        if data_batch_size_per_gpu < 1:
            raise ValueError(f"data_batch_size_per_gpu must be >= 1, got {data_batch_size_per_gpu}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 (or None for data_batch_size_per_gpu), got {eval_batch_size}")
        self.tokenizer = tokenizer
        self.template = ConversationTemplate(conversation_template)
        self.rubric = Rubric.from_callable(reward_fn)
        self.correct_part = correct_part
        self.batch_size = data_batch_size_per_gpu
        self.eval_batch_size = data_batch_size_per_gpu if eval_batch_size is None else eval_batch_size
        self.accelerator = accelerator
        self.return_raw_completions = return_raw_completions
        self.max_context_length = max_context_length
        self.seed = seed
        self._data = {
            "train": self._prepare(_rows(train_dataset, "train_dataset"), "train"),
            "test": self._prepare(_rows(test_dataset, "test_dataset"), "test"),
        }
        if validation_dataset is not None:
            self._data["validation"] = self._prepare(_rows(validation_dataset, "validation_dataset"), "validation")
        self.evaluation_mode = False
        self._eval_split = "test"
        self.num_epochs = 0
        self._position = {name: 0 for name in self._data}
        self._pending: dict[str, list[int] | None] = {name: None for name in self._data}
        self.last_scores: list[list[Score]] = []
        self.last_texts: list[list[str]] = []
        self._batch_shard: tuple[int, int] | None = None

    # ---------------------------------------------------------------- data
    def _prepare(self, rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
        columns = list(rows[0])
        try:
            self.template.validate_columns(columns)
        except TemplateError as err:
            raise TemplateError(f"{split}_dataset: {err}") from None
        if self.rubric.positional_parts:
            missing = {"question", "answer"} - set(columns)
            if missing:
                raise ValueError(
                    f"{split}_dataset needs columns 'question' and 'answer' for a reward_fn(completion, answer, "
                    f"question); it has {sorted(columns)}. Rename columns or pass a Rubric"
                )
        if self.tokenizer is None:
            if self.max_context_length is not None:
                raise ValueError("max_context_length counts tokens: give a tokenizer, or leave it None")
            return {"rows": self._shard_rows(rows), "texts": None, "ids": None}
        texts = [self.template.render_text(row, self.tokenizer) for row in rows]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep = list(range(len(rows)))
        if self.max_context_length is not None:
            keep = [i for i in keep if len(ids[i]) <= self.max_context_length]
            dropped = len(rows) - len(keep)
            if dropped:
                warnings.warn(
                    f"{split}: {dropped} of {len(rows)} problems have templated prompts longer than "
                    f"max_context_length={self.max_context_length} tokens and were dropped",
                    stacklevel=3,
                )
            if not keep:
                raise ValueError(
                    f"{split}: every prompt is longer than max_context_length={self.max_context_length}; "
                    f"the shortest is {min(len(x) for x in ids)} tokens"
                )
        keep = self._shard(keep)
        return {"rows": [rows[i] for i in keep], "texts": [texts[i] for i in keep], "ids": [ids[i] for i in keep]}

    def _shard_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [rows[i] for i in self._shard(list(range(len(rows))))]

    def _shard(self, indices: list[int]) -> list[int]:
        """This process's share of ``indices``: every process gets the same count.

        The list is padded by wrapping around to a multiple of the process count (as
        ``DistributedSampler`` does), so all processes run the same number of batches and none
        waits forever in a collective call. Filtering happens before, on every process alike.
        """
        world = int(getattr(self.accelerator, "num_processes", 1) or 1) if self.accelerator is not None else 1
        if world <= 1:
            return indices
        rank = int(self.accelerator.process_index)
        padded = indices + [indices[k % len(indices)] for k in range(-len(indices) % world)]
        return padded[rank::world]

    def __len__(self) -> int:
        """Number of training problems."""
        return len(self._data["train"]["rows"])

    def num_problems(self, split: str | None = None) -> int:
        """Number of problems of ``split`` (default: the current one) on this process.

        Args:
            split: ``"train"``, ``"test"``, ``"validation"`` (when the env has one) or ``None`` for
                the current split.

        Returns:
            The count after ``max_context_length`` filtering and accelerator sharding.
        """
        return len(self._data[self._check_split(split)]["rows"])

    def num_batches(self, split: str | None = None) -> int:
        """Batches that cover ``split`` exactly once; the last one may be partial.

        An evaluation covers the test problems once, in a fixed order::

            with env.eval_mode():
                prompts = env.reset(reset_dataloaders=True)
                for i in range(env.num_batches("test")):
                    completions = agent.get_action(prompts)
                    prompts, rewards = env.step(completions)

        Args:
            split: ``"train"``, ``"test"`` or ``None`` for the current split.

        Returns:
            ``ceil(num_problems / batch size)`` (:meth:`batch_size_of` the split).
        """
        return -(-self.num_problems(split) // self.batch_size_of(split))

    def batch_size_of(self, split: str | None = None) -> int:
        """Prompts per batch of ``split`` (default: the current one): ``data_batch_size_per_gpu`` for
        training, ``eval_batch_size`` for the held-out splits."""
        return self.batch_size if self._check_split(split) == "train" else self.eval_batch_size

    def _check_split(self, split: str | None) -> str:
        if split is None:
            return self.split
        if split not in self._data:
            extra = "" if "validation" in self._data else " ('validation' needs a validation_dataset)"
            raise ValueError(f"split must be 'train', 'test' or None (the current one), got {split!r}{extra}")
        return split

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this env serves: ``("train", "test")``, plus ``"validation"`` when it has one."""
        return tuple(self._data)

    @property
    def split(self) -> str:
        """The split :meth:`eval_mode` serves (``"test"`` by default) inside it, else ``"train"``."""
        return self._eval_split if self.evaluation_mode else "train"

    def _order(self, split: str) -> np.ndarray:
        n = len(self._data[split]["rows"])
        if split != "train":
            return np.arange(n)
        return np.random.default_rng([self.seed, self.num_epochs]).permutation(n)

    def _next_indices(self) -> list[int]:
        split = self.split
        n = len(self._data[split]["rows"])
        pos = self._position[split]
        if pos >= n:  # end of the data: a new epoch (training) or back to the start (test)
            if split == "train":
                self.num_epochs += 1
            pos = 0
        order = self._order(split)
        batch = order[pos : pos + self.batch_size_of(split)].tolist()
        self._position[split] = pos + len(batch)
        return batch

    def _prompts(self, indices: list[int]) -> list[Prompt]:
        data = self._data[self.split]
        if data["ids"] is None:  # no tokenizer: the conversation only
            return [{"messages": tuple(self.template.render(data["rows"][i])), "text": None} for i in indices]
        prompts = []
        for i in indices:
            ids = torch.tensor([data["ids"][i]], dtype=torch.long)  # [1, L]
            prompts.append({
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "text": data["texts"][i] if self.return_raw_completions else None,
            })
        return prompts

    def _issue_batch(self) -> list[Prompt]:
        indices = self._next_indices()
        if self._batch_shard is not None:  # every process draws the same batch and keeps its share
            rank, world = self._batch_shard
            indices = indices[rank::world]
        self._pending[self.split] = indices
        return self._prompts(indices)

    @property
    def batch_shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` set by :meth:`shard_batches`, or None (whole batches)."""
        return self._batch_shard

    def shard_batches(self, rank: int, world_size: int) -> None:
        """Serve process ``rank`` of ``world_size`` its share of every batch: prompts ``rank::world_size``.

        Data-parallel training (:mod:`~llm_gym.algorithms.run.distributed`) calls this on every
        process: each holds all the data and draws the same batches in the same order (the data
        position stays the same on every process, so one checkpoint resumes them all), and
        ``reset``/``step``/``score`` then see only this process's prompts. ``num_problems`` and
        ``num_batches`` still count the whole split. A batch shorter than ``world_size`` (the last
        of a held-out split) leaves some processes an empty share (``reset`` returns ``[]``).

        Unlike the ``accelerator`` argument (AgileRL's: every process its own shard of the data
        and ``data_batch_size_per_gpu`` prompts per process), the batch size here is global.

        Args:
            rank: This process's rank, ``0 <= rank < world_size``.
            world_size: Processes; 1 serves whole batches again.

        Raises:
            UsageError: When the batch size is below ``world_size`` (a process would get no prompt),
                or the training split's last batch is (so a step would leave a process idle).
        """
        from llm_gym.usage import UsageError

        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if world_size == 1:
            self._batch_shard = None
            return
        if self.batch_size < world_size:
            raise UsageError(
                f"{world_size} processes need at least {world_size} prompts per step, got "
                f"prompts_per_step (data_batch_size_per_gpu)={self.batch_size}: raise it to a multiple of "
                f"{world_size}, or launch with --num_processes {self.batch_size}"
            )
        last = self.num_problems("train") % self.batch_size
        if 0 < last < world_size:
            raise UsageError(
                f"the last training batch of each epoch has {last} prompts ({self.num_problems('train')} problems, "
                f"{self.batch_size} per step), fewer than the {world_size} processes: make the training problems "
                f"a multiple of {self.batch_size}"
            )
        self._batch_shard = (rank, world_size)

    # ----------------------------------------------------------------- API
    def reset(self, reset_dataloaders: bool = False) -> list[Prompt]:
        """The next batch of prompts of the current split.

        Args:
            reset_dataloaders: Start the current split over from its first problem.

        Returns:
            One dict per prompt: ``input_ids`` and ``attention_mask`` of shape ``[1, L]``, and
            ``text`` (the prompt string when ``return_raw_completions``, else ``None``); without a
            tokenizer ``messages`` (the rendered conversation) and ``text`` (``None``).
        """
        if reset_dataloaders:
            self._position[self.split] = 0
        return self._issue_batch()

    def pending_problems(self) -> list[dict[str, Any]]:
        """The problems (data rows) of the pending batch of the current split, in prompt order.

        Raises:
            RuntimeError: if no batch is pending (call ``reset`` first).
        """
        indices = self._pending[self.split]
        if indices is None:
            raise RuntimeError(f"no {self.split} batch is pending: call reset() first")
        return [dict(self._data[self.split]["rows"][i]) for i in indices]

    def step(self, completions: Sequence[Any]) -> tuple[list[Prompt], torch.Tensor]:
        """Score the completions of the last batch and return the next batch.

        Args:
            completions: One entry per prompt of the last batch, either a tensor of token ids of
                shape ``[group_size, prompt_len + completion_len]`` (the prompt followed by the
                completion, AgileRL's format) or a list of ``group_size`` completion strings.

        Returns:
            ``(next_prompts, rewards)`` with rewards of shape ``[num_prompts, group_size]``.

        Raises:
            RuntimeError: if no batch is pending in the current split (call ``reset`` first).
            ValueError: if the number of entries or group sizes do not match.
        """
        rewards = self.score(completions)
        return self._issue_batch(), rewards

    def score(self, completions: Sequence[Any]) -> torch.Tensor:
        """Score completions of the pending batch without drawing a new one (see :meth:`step`).

        The pending batch stays pending, so several agents of a population can be scored on the
        same prompts; :meth:`reset` (or :meth:`step`) then moves on to the next batch.
        """
        split = self.split
        indices = self._pending[split]
        if indices is None:
            raise RuntimeError(f"no {split} batch is pending: call reset() before step()")
        if len(completions) != len(indices):
            raise ValueError(f"got completions for {len(completions)} prompts; the batch has {len(indices)}")
        data = self._data[split]
        ids = data["ids"] or [None] * len(data["rows"])
        texts = [self._decode(c, ids[i], k) for k, (c, i) in enumerate(zip(completions, indices, strict=True))]
        group = {len(t) for t in texts}
        if len(group) != 1 or 0 in group:
            raise ValueError(f"every prompt needs the same, non-zero number of completions; got {sorted(group)}")
        prefill = self.template.prefill
        self.last_texts = texts
        self.last_scores = [
            [self.rubric.score(text, data["rows"][i], prefill) for text in group_texts]
            for group_texts, i in zip(texts, indices, strict=True)
        ]
        return torch.tensor([[s.total for s in row] for row in self.last_scores], dtype=torch.float32)

    def _decode(self, completion: Any, prompt_ids: list[int] | None, k: int) -> list[str]:
        if isinstance(completion, torch.Tensor):
            if prompt_ids is None:
                raise ValueError("this env has no tokenizer to decode token ids: give completion strings")
            if completion.dim() != 2:
                raise ValueError(f"a completion tensor must be [group_size, seq_len], got {tuple(completion.shape)}")
            prompt_len = len(prompt_ids)
            # The ids must start with this prompt: completions of another batch (e.g. of the test split
            # after an evaluation, AgileRL #591) would otherwise be scored against the wrong answers.
            expected = torch.tensor(prompt_ids, dtype=completion.dtype, device=completion.device)
            if completion.shape[1] < prompt_len or not bool((completion[:, :prompt_len] == expected).all()):
                raise ValueError(
                    f"completion {k} does not start with prompt {k} of the pending {self.split} batch: give "
                    "each prompt's own ids followed by its completion, [group_size, prompt_len + completion_len], "
                    "in the order of the last reset()/step()"
                )
            return self.tokenizer.batch_decode(completion[:, prompt_len:], skip_special_tokens=True)
        if isinstance(completion, str):
            raise ValueError("give a list of completion strings per prompt, not one string")
        return [str(c) for c in completion]

    @contextmanager
    def side_batch(self) -> Iterator[None]:
        """Draw and score extra batches inside the block, then restore the pending batch.

        Dynamic sampling (:mod:`~llm_gym.algorithms.grpo.dynamic`) refills one agent's batch with
        ``reset()`` + ``score()`` here while the step's shared batch stays pending for the other
        agents. The data position moves on: the extra problems are consumed.
        """
        split = self.split
        saved = self._pending[split]
        try:
            yield
        finally:
            self._pending[split] = saved

    @contextmanager
    def eval_mode(self, split: str = "test") -> Iterator[None]:
        """Serve a held-out split inside the ``with`` block, then restore the previous mode.

        Args:
            split: ``"test"`` (the final report) or ``"validation"`` (fitness, when the env has one).

        Raises:
            ValueError: On ``"train"`` or a split the env does not have.
        """
        if split == "train" or self._check_split(split) != split:
            raise ValueError(f"eval_mode serves a held-out split ('test' or 'validation'), got {split!r}")
        previous = self.evaluation_mode, self._eval_split
        self.evaluation_mode, self._eval_split = True, split
        try:
            yield
        finally:
            self.evaluation_mode, self._eval_split = previous

    def last_metrics(self) -> dict[str, float]:
        """Mean total and per-part rewards of the last scored batch (``reward/<part>``)."""
        flat = [s for row in self.last_scores for s in row]
        if not flat:
            return {}
        metrics = {"reward/total": float(np.mean([s.total for s in flat]))}
        for name in self.rubric.names:
            metrics[f"reward/{name}"] = float(np.mean([s.parts[name] for s in flat]))
        if self.correct_part is not None:
            metrics["accuracy"] = float(np.mean([s.correct(self.correct_part) for s in flat]))
        metrics["reward/failures"] = float(sum(len(s.errors) for s in flat))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Data position and epoch, to resume a run where it stopped."""
        return {"num_epochs": self.num_epochs, "position": dict(self._position), "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the pending batches are not restored: call ``reset``)."""
        self.num_epochs = int(state["num_epochs"])
        self._position.update({k: int(v) for k, v in state["position"].items()})
        self.seed = int(state["seed"])

    # ------------------------------------------------------------ builders
    @classmethod
    def from_task(
        cls,
        env_id: str,
        tokenizer: Any,
        *,
        train_size: int | None = 1000,
        test_size: int | None = 100,
        dataset: Any = None,
        seed: int = 42,
        data_batch_size_per_gpu: int = 8,
        conversation_template: Sequence[Mapping[str, str]] | None = None,
        reward_fn: Rubric | Callable[..., float] | None = None,
        validation_size: int | None = 0,
        validation_fraction: float = 0.1,
        **kwargs: Any,
    ) -> ReasoningGym:
        """A ReasoningGym over a registered task: its problems, template and rubric.

        Args:
            env_id: A registered id such as ``"llm_gym/Countdown-v0"``.
            tokenizer: A tokenizer with a chat template.
            train_size: Training problems (``None``: all rows of ``dataset``).
            test_size: Held-out problems (``None``: all rows).
            dataset: ``None`` for the task's generator, else data as for ``gym.make(..., dataset=...)``.
            seed: Seed of the generated problems and of the shuffling.
            data_batch_size_per_gpu: Prompts per batch.
            conversation_template: Overrides the task's template.
            reward_fn: Overrides the task's rubric.
            validation_size: Validation problems (fitness); 0 means no validation split (and the
                training problems are exactly those of an env without one); ``None``: all rows.
            validation_fraction: Share of the problem space (hash buckets) the validation split
                takes out of the training share when ``validation_size`` is not 0.
            **kwargs: The task's knobs, plus ``max_context_length``, ``return_raw_completions``,
                ``accelerator``, ``eval_batch_size``.

        Returns:
            The environment.
        """
        from llm_gym.env import build_problems
        from llm_gym.registry import get_task

        task = get_task(env_id)
        own = {k: kwargs.pop(k) for k in ("max_context_length", "return_raw_completions", "accelerator", "eval_batch_size")
               if k in kwargs}  # fmt: skip
        fraction = validation_fraction if validation_size != 0 else 0.0
        splits = {name: build_problems(task, dataset=dataset, split=name, size=size, seed=seed,
                                       validation_fraction=fraction, **kwargs)
                  for name, size in (("train", train_size), ("test", test_size), ("validation", validation_size))
                  if name != "validation" or fraction}  # fmt: skip
        train, test = splits["train"], splits["test"]
        gym = cls(
            train_dataset=list(train),
            test_dataset=list(test),
            tokenizer=tokenizer,
            reward_fn=task.rubric.copy() if reward_fn is None else reward_fn,  # its own failure counter
            conversation_template=task.template if conversation_template is None else conversation_template,
            data_batch_size_per_gpu=data_batch_size_per_gpu,
            seed=seed,
            correct_part=task.correct_part if reward_fn is None else None,
            validation_dataset=list(splits["validation"]) if "validation" in splits else None,
            **own,
        )
        gym.task = task
        return gym
