"""The body of ``llm-gym eval``: a policy on held-out problems, one report, optional JSONL and dataset.

Three kinds of policy answer the same problems and go through the same records
(:class:`~llm_gym.rollout_record.RolloutRecord`), report (:mod:`llm_gym.eval_report`), rollout log
(:mod:`llm_gym.rollout_store`) and dataset (:mod:`llm_gym.rollout_dataset`):

* the task's oracle and a local causal LM (``--model PATH``), through the shared rollout and
  evaluation of training's fitness (:func:`llm_gym.algorithms.rollout.rollout.evaluate`);
* any OpenAI-compatible endpoint (``--base-url URL --model NAME``), through
  :mod:`llm_gym.endpoint`, with a request cache (:mod:`llm_gym.request_cache`) and ``--resume``.

Bad input is one line on stderr naming the fix and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from llm_gym.console import emit, fail
from llm_gym.eval_report import EvalReport, summarize
from llm_gym.registry import get_task, list_envs, list_task_envs
from llm_gym.rollout_record import RolloutRecord, failed_record, scored_record
from llm_gym.table import format_table
from llm_gym.task import Task
from llm_gym.usage import UsageError, check_model_source

__all__ = ["add_endpoint_args", "run_eval"]

logger = logging.getLogger(__name__)


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """The endpoint, sampling and output flags of ``llm-gym eval``."""
    parser.add_argument("--base-url", help="an OpenAI-compatible API root (vLLM, SGLang, hosted), e.g. "
                        "http://127.0.0.1:8000/v1; --model is then the served model's name")  # fmt: skip
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="environment variable holding the API key (default OPENAI_API_KEY if set, else none)")
    parser.add_argument("-r", "--rollouts", type=int, default=1, help="samples per problem (pass@k uses them)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--temperature", type=float, default=1.0, help="endpoint sampling temperature")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--max-retries", type=int, default=3, help="retries of a failed request (429, 5xx, ...)")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, then doubled")
    parser.add_argument("--prefill", choices=("continue", "drop"), default="continue",
                        help="a template's assistant prefill: 'continue' asks the server to continue it (vLLM, SGLang: "
                        "continue_final_message); 'drop' sends the conversation without it and scores the answer as "
                        "a whole assistant turn (for hosted APIs, which cannot continue a message)")  # fmt: skip
    parser.add_argument("--stream", action="store_true",
                        help="stream the answers: the progress bar counts tokens as they arrive")
    parser.add_argument("--out", help="folder of the rollout log (rollouts.jsonl); default evals/<time> with "
                        "--base-url, none otherwise")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the eval in --out: finished answers are "
                        "not asked again")  # fmt: skip
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the request cache")
    parser.add_argument("--save-dataset", metavar="DIR", help="save the rollouts as a Hugging Face dataset")


def _default_eval_tasks() -> list[str]:
    """Tasks the oracle can run offline: an oracle, a generator and every optional requirement installed."""
    ids = []
    for env_id in list_task_envs():
        task = get_task(env_id)
        if task.solve is not None and task.generate is not None and not task.missing_requirements:
            ids.append(env_id)
    return ids


def _problems(task: Task, args: argparse.Namespace, knobs: dict[str, Any]) -> list[dict[str, Any]]:
    """The first ``-n`` problems of the chosen split."""
    from llm_gym.env import build_problems

    size = None if args.dataset else args.num_problems
    problems = build_problems(task, dataset=args.dataset, split=args.split, size=size, seed=args.seed, **knobs)
    return [problems[i] for i in range(min(args.num_problems, len(problems)))]


def _check(args: argparse.Namespace, tasks: list[str]) -> None:
    """Every check of the arguments that needs no work: raise :class:`UsageError` naming the fix."""
    if args.rollouts < 1:
        raise UsageError(f"-r {args.rollouts}: ask at least one sample per problem (-r 1 or more)")
    if args.num_problems < 1:
        raise UsageError(f"-n {args.num_problems}: evaluate at least one problem (-n 1 or more)")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency {args.concurrency}: allow at least one request in flight")
    if not args.timeout > 0 or args.max_retries < 0 or args.backoff < 0:
        raise UsageError(f"--timeout {args.timeout} must be positive seconds, --max-retries {args.max_retries} and "
                        f"--backoff {args.backoff} at least 0")  # fmt: skip
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_new_tokens}: allow at least one completion token")
    if args.base_url and not args.model:
        raise UsageError("--base-url needs --model NAME: the model name the server serves")
    writes = [flag for flag, on in (("--out", args.out), ("--save-dataset", args.save_dataset),
                                    ("--resume", args.resume), ("--base-url", args.base_url)) if on]  # fmt: skip
    if writes and len(tasks) != 1:
        raise UsageError(f"{writes[0]} evaluates one task: pass exactly one --task")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR: the folder of the eval to continue")
    if args.resume and not args.base_url:
        raise UsageError("--resume continues an endpoint eval (--base-url); a local eval simply runs again")
    if args.save_dataset and Path(args.save_dataset).exists() and any(Path(args.save_dataset).iterdir()):
        raise UsageError(f"--save-dataset {args.save_dataset} exists and is not empty: choose another folder")
    for env_id in tasks:
        if _multi_turn(env_id) and not args.model:
            raise UsageError(f"{env_id} is a multi-turn env with no oracle here: pass --model PATH (a local model "
                            "or an elite) or --base-url URL --model NAME")  # fmt: skip


def _check_tasks(args: argparse.Namespace, tasks: list[str], knobs: dict[str, Any]) -> None:
    """Each single-turn task registered, its knobs valid and, without ``--model``, an oracle to run."""
    import gymnasium as gym

    for env_id in tasks:
        if _multi_turn(env_id):
            continue
        try:
            task = get_task(env_id)
        except gym.error.Error as err:
            raise UsageError(f"--task {env_id}: {err}") from None
        try:
            task.make_config(**knobs)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--task-kwargs: {err}") from None
        if args.model is None and task.solve is None:
            raise UsageError(f"{task.env_id} has no oracle solver: pass --model")


def _load_model(name: str, max_new_tokens: int) -> tuple[Any, Any]:
    """``(policy, tokenizer)`` of ``--model``; a model that cannot be loaded is a :class:`UsageError`."""
    from llm_gym.algorithms.rollout.policies import ModelPolicy

    check_model_source(name)
    try:
        return ModelPolicy.from_pretrained(name, max_new_tokens)
    except OSError as err:  # transformers: no such hub repo, no network, missing weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {name}: cannot load it ({first}); give a local model folder or a hub id") from None


def _multi_turn(env_id: str) -> bool:
    return env_id in list_envs() and env_id not in list_task_envs()


def _api_key(args: argparse.Namespace) -> str:
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set; "
                            f"export {args.api_key_env}=<your key> (the key is never passed as a flag)")  # fmt: skip
        return key
    return os.environ.get("OPENAI_API_KEY") or "EMPTY"  # a local vLLM/SGLang server takes any key


class _Repeated:
    """A local policy asked for ``R`` samples per prompt (sampled when it can sample)."""

    def __init__(self, policy: Any, samples: int) -> None:
        self.policy, self.samples = policy, samples

    def get_action(self, prompts: Any, training: bool = False) -> tuple[list[Any], Any]:
        from llm_gym.algorithms.rollout.policies import ModelPolicy

        if isinstance(self.policy, ModelPolicy):
            return self.policy.get_action(prompts, training=True, group_size=self.samples)
        completions, masks = self.policy.get_action(prompts, training=training)
        return [list(c) * self.samples for c in completions], masks  # a deterministic policy: R equal answers


def _local_records(task: Task, args: argparse.Namespace, knobs: dict[str, Any], loaded: Any) -> list[RolloutRecord]:
    """The oracle's or a local model's records, through the shared evaluation."""
    from llm_gym.algorithms.rollout.policies import OraclePolicy
    from llm_gym.algorithms.rollout.rollout import evaluate
    from llm_gym.reasoning_gym import ReasoningGym

    model_policy, tokenizer = loaded
    rows = _problems(task, args, knobs)
    # The rows are the env's held-out split (what evaluate() reads); its training split is unused.
    env = ReasoningGym(rows, rows, tokenizer, task.rubric.copy(), task.template, data_batch_size_per_gpu=16,
                       correct_part=task.correct_part)  # fmt: skip
    try:
        policy = model_policy if model_policy is not None else OraclePolicy(task, env)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.rollouts > 1:
        policy = _Repeated(policy, args.rollouts)
    records: list[RolloutRecord] = []
    evaluate(policy, env, greedy=args.rollouts == 1, records=records)
    return records


class _EndpointRun:
    """One endpoint eval's client, request cache, rollout log and progress bar."""

    def __init__(self, args: argparse.Namespace, store: Any, total: int) -> None:
        from tqdm.auto import tqdm

        from llm_gym.endpoint import EndpointConfig
        from llm_gym.request_cache import RequestCache

        self.config = EndpointConfig(
            base_url=args.base_url, model=args.model, api_key=_api_key(args), concurrency=args.concurrency,
            timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff, temperature=args.temperature,
            max_tokens=args.max_new_tokens, stream=args.stream,
        )  # fmt: skip
        self.cache = None if args.no_cache else RequestCache()
        self.store = store
        self.client: Any = None
        self.bar = tqdm(total=total, desc=args.model, unit="rollout", disable=None)
        self.start, self.tokens, self.errors = time.perf_counter(), 0, 0

    async def ask(self, key: Any, messages: Any, sample: int) -> Any:
        """One answer: from the cache, else from the endpoint (then cached when it succeeded)."""
        from llm_gym.endpoint import Answer, Request
        from llm_gym.request_cache import request_key

        cache_key = request_key(self.config.base_url, self.config.model, messages, self.config.sampling, sample)
        hit = self.cache.get(cache_key) if self.cache is not None else None
        if hit is not None:
            return Answer(key, hit["text"], hit.get("completion_tokens"), attempts=0)
        answer = await self.client.ask(Request(key, messages))
        if answer.error is None and self.cache is not None:
            self.cache.put(cache_key, {"text": answer.text, "completion_tokens": answer.completion_tokens})
        if not self.config.stream:  # a stream counted its tokens as they came (_on_tokens)
            self.tokens += answer.completion_tokens or 0
        self.errors += answer.error is not None
        self._postfix()
        return answer

    def _postfix(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tok_s=f"{rate:.0f}", errors=self.errors, refresh=False)

    def _on_tokens(self, key: Any, n: int) -> None:
        self.tokens += n
        self._postfix()
        self.bar.refresh()

    def log(self, record: RolloutRecord) -> None:
        """Append a finished rollout to the log and advance the bar."""
        self.store.append(record)
        self.bar.update(1)

    def run(self, work: Any) -> None:
        """Run ``work()`` (a coroutine function) with a live client."""
        from llm_gym.endpoint import EndpointClient

        async def main() -> None:
            self.client = EndpointClient(self.config)
            self.client.on_tokens = self._on_tokens
            try:
                await work()
            finally:
                await self.client.close()

        try:
            asyncio.run(main())
        finally:
            self.bar.close()
        logger.info("%d cache hits", self.cache.hits if self.cache is not None else 0)


def _pending(store: Any, n: int, samples: int) -> list[tuple[int, int]]:
    done = store.done
    return [(i, s) for i in range(n) for s in range(samples) if f"{i}:{s}" not in done]


def _endpoint_records(task: Task, args: argparse.Namespace, knobs: dict[str, Any], store: Any) -> list[RolloutRecord]:
    """A task's records from an endpoint: each answer scored and logged as it arrives."""
    from llm_gym.endpoint import gather_or_cancel

    rubric, prefill = task.rubric.copy(), task.template.prefill
    drop = args.prefill == "drop" and bool(prefill)
    prefill = "" if drop else prefill  # a dropped prefill: the answer is the whole assistant turn
    rows = _problems(task, args, knobs)
    keys = _pending(store, len(rows), args.rollouts)
    run = _EndpointRun(args, store, len(keys))

    async def one(i: int, s: int) -> None:
        messages = task.template.render(rows[i])
        messages = messages[:-1] if drop else messages
        answer = await run.ask((i, s), messages, s)
        if answer.error is not None:
            run.log(failed_record(i, s, rows[i], messages, answer.error))
        else:
            score = rubric.score(answer.text or "", rows[i], prefill)
            run.log(scored_record(i, s, rows[i], messages, answer.text or "", score, task.correct_part,
                                  answer.completion_tokens))  # fmt: skip

    run.run(lambda: gather_or_cancel([one(i, s) for i, s in keys]))
    return store.records()


def _episode_env(env_id: str, args: argparse.Namespace, knobs: dict[str, Any]) -> Any:
    """A factory of fresh envs over the split's first ``-n`` episodes (checked once here)."""
    import gymnasium as gym

    def make_env() -> Any:
        return gym.make(env_id, split=args.split, size=args.num_problems, seed=args.seed, **knobs).unwrapped

    try:
        make_env()
    except (TypeError, ValueError) as err:
        raise UsageError(f"{env_id}: {err}") from None
    return make_env


def _endpoint_episodes(env_id: str, args: argparse.Namespace, knobs: dict[str, Any], store: Any) -> list[RolloutRecord]:
    """A multi-turn env's records from an endpoint: one per episode (:mod:`llm_gym.game_eval`)."""
    from llm_gym.game_eval import play_episodes

    make_env = _episode_env(env_id, args, knobs)
    keys = _pending(store, args.num_problems, args.rollouts)
    run = _EndpointRun(args, store, len(keys))
    run.run(lambda: play_episodes(make_env, keys, run.ask, run.log))
    return store.records()


def _local_episodes(env_id: str, args: argparse.Namespace, knobs: dict[str, Any], loaded: Any) -> list[RolloutRecord]:
    """A multi-turn env played by a local model, turn by turn, into the same records as an endpoint's."""
    import torch

    from llm_gym.endpoint import Answer
    from llm_gym.game_eval import play_episodes

    policy, tokenizer = loaded
    if policy is None:
        raise UsageError(f"{env_id} is a multi-turn env with no oracle here: pass --model PATH (a local model or "
                        "an elite) or --base-url URL --model NAME")  # fmt: skip
    make_env = _episode_env(env_id, args, knobs)
    torch.manual_seed(args.seed)

    async def ask(key: Any, messages: Any, sample: int) -> Answer:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)  # [1, L]
        prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        completions, masks = policy.get_action([prompt], training=args.rollouts > 1, group_size=1)
        new = completions[0][0, ids.shape[1] :]  # the model's turn after the prompt
        return Answer(key, tokenizer.decode(new, skip_special_tokens=True), int(masks[0][0].sum()))

    records: list[RolloutRecord] = []
    keys = [(i, s) for i in range(args.num_problems) for s in range(args.rollouts)]
    asyncio.run(play_episodes(make_env, keys, ask, records.append))
    return sorted(records, key=lambda r: (r.problem, r.sample))


def _table_rows(env_id: str, policy: str, split: str, report: EvalReport) -> list[tuple[Any, ...]]:
    return [(env_id, policy, split, name, value) for name, value in report.rows()]


def run_eval(args: argparse.Namespace, task_kwargs: dict[str, Any]) -> int:
    """Run ``llm-gym eval`` and print its table.

    Args:
        args: The parsed arguments (see :func:`add_endpoint_args` and the ``eval`` parser).
        task_kwargs: The parsed ``--task-kwargs``.

    Returns:
        The exit status: 0, or 1 when every endpoint request failed.

    Raises:
        UsageError: on bad input (``llm-gym`` prints it as one line and exits 2; nothing is written).
    """
    from llm_gym.endpoint import EndpointFatal
    from llm_gym.rollout_store import RolloutStore, StoreError

    tasks = args.task or _default_eval_tasks()
    try:
        _check(args, tasks)
        _check_tasks(args, tasks, task_kwargs)
        if args.base_url:
            _api_key(args)
        out = args.out or (f"evals/{time.strftime('%Y%m%d-%H%M%S')}" if args.base_url else None)
        loaded: Any = (None, None)
        if args.model and not args.base_url:
            loaded = _load_model(args.model, args.max_new_tokens or 128)
        rows = []
        for env_id in tasks:
            task = None if _multi_turn(env_id) else get_task(env_id)
            run = {"task": env_id, "task_kwargs": task_kwargs, "split": args.split, "seed": args.seed,
                   "n": args.num_problems, "r": args.rollouts, "dataset": args.dataset, "model": args.model,
                   "base_url": args.base_url, "temperature": args.temperature if args.base_url else None,
                   "max_tokens": args.max_new_tokens, "prefill": args.prefill if args.base_url else None}  # fmt: skip
            store = RolloutStore(out, run, resume=args.resume) if out else None
            if args.base_url:
                assert store is not None  # an endpoint eval always logs (out defaults to evals/<time>)
                with store:
                    if task is None:
                        records = _endpoint_episodes(env_id, args, task_kwargs, store)
                    else:
                        records = _endpoint_records(task, args, task_kwargs, store)
            else:
                if task is None:
                    records = _local_episodes(env_id, args, task_kwargs, loaded)
                else:
                    records = _local_records(task, args, task_kwargs, loaded)
                if store is not None:
                    with store:
                        store.extend(records)
            report = summarize(records, args.rollouts)
            rows += _table_rows(env_id, args.model or "oracle", args.split, report)
            logger.info("%s: %s", env_id, report)
            saved = False
            if args.save_dataset and report.rollouts:
                from llm_gym.rollout_dataset import save_rollouts

                save_rollouts(records, args.save_dataset)
                saved = True
    except (EndpointFatal, StoreError) as err:  # bad input found on the way: the main entry prints it
        raise UsageError(str(err)) from None
    emit(format_table(rows, ["env", "policy", "split", "reward part", "mean"]))
    if out:
        emit(f"rollouts: {Path(out) / 'rollouts.jsonl'}")
    if args.save_dataset and not saved:  # not bad input: the endpoint answered nothing
        return fail("eval", f"every request failed, so there is no dataset to save in {args.save_dataset}; "
                    f"see the errors in {Path(out or '.') / 'rollouts.jsonl'} and rerun with --resume", status=1)
    if args.save_dataset:
        emit(f"dataset: {args.save_dataset}")
    return 0
