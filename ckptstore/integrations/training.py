"""Training loops: save everything a bit-exact resume needs, and resume after a crash.

    store = ckptstore.open(os.environ.get("CKPTSTORE_URL", "ckpts"))
    sampler = ResumableRandomSampler(dataset, seed=0)
    run = Checkpointer(store, model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    start = run.resume()            # restores in place from its branch's head; 0 if fresh
    for step in range(start, total_steps):
        ...
        if step % 100 == 0:
            run.save(step + 1, metrics={"eval_loss": loss})

What a checkpoint holds: each named component's ``state_dict()``, every RNG state (Python,
NumPy, torch CPU and CUDA), the step, and a user dict. Restoring puts the RNGs back exactly,
so dropout masks and shuffles after a resume are the ones an uninterrupted run would draw.

The resume rule, shared by every integration (:func:`resume_ref`): a job on branch B resumes
from B's head, never from ``latest`` (the newest commit on any branch, which another job's
commits move).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch

from ..errors import ComponentsUnavailable, InvalidOption, InvalidOptionType, StoreNotFound, UnknownRef
from ..store import Store, StoreConfig, open_store

log = logging.getLogger("ckptstore.training")

#: Environment variables a relaunched job reads, so it resumes without code changes.
URL_ENV = "CKPTSTORE_URL"
REF_ENV = "CKPTSTORE_REF"
BRANCH_ENV = "CKPTSTORE_BRANCH"

RNG_KEY = "rng"
STEP_KEY = "step"
USER_KEY = "user"


def resume_ref(store: Store | None, *, ref: str | None = None, branch: str | None = None) -> str:
    """The revision a (re)started job resumes from: ``ref``, else ``$CKPTSTORE_REF``, else
    the head of the job's branch (``branch``, else ``$CKPTSTORE_BRANCH``, else the store's
    default branch). Never ``latest``, which another branch's commits move."""
    default_branch = store.config.default_branch if store is not None else StoreConfig.default_branch
    return ref or os.environ.get(REF_ENV) or branch or os.environ.get(BRANCH_ENV) or default_branch


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state: Python's ``random``, NumPy's legacy global generator, torch's
    CPU generator and, if CUDA is initialised, every CUDA device's generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back RNG states captured by :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class ResumableRandomSampler(torch.utils.data.Sampler[int]):
    """A shuffling sampler that can resume mid-epoch: the order of epoch ``e`` is a
    permutation drawn from ``seed + e``, and ``state_dict()`` records the epoch and how many
    indices were handed out. Pass it to ``DataLoader(sampler=...)``; call nothing else."""

    def __init__(self, data_source: Sized, *, seed: int = 0) -> None:
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


class Checkpointer:
    """Saves and restores named components (anything with ``state_dict()`` /
    ``load_state_dict()``: model, optimizer, scheduler, grad scaler, sampler) with the RNG
    states, the step and a user dict.

    ``branch`` (default ``$CKPTSTORE_BRANCH``, else the store's default branch) is where
    :meth:`save` commits; :attr:`ref` (default ``$CKPTSTORE_REF``, else that branch) is what
    :meth:`resume` restores from, so a restarted job resumes its own branch's head whatever
    other branches committed since (see :func:`resume_ref`).

    The components are stored under their names, like a plain ``store.commit({"model": ...,
    "optimizer": ..., "step": ...})``, so either resumes the other's commits.

    For a bit-exact resume, give the DataLoader ``generator=torch.Generator()``: creating a
    loader iterator otherwise draws a seed from the global RNG, and a resumed run creates
    one at another step than an uninterrupted run. With worker processes, a prefetching
    loader has asked the sampler for indices it has not yet yielded: use ``num_workers=0``
    or save where nothing is prefetched.
    """

    def __init__(self, store: Store, *, ref: str | None = None, branch: str | None = None, **components: Any) -> None:
        for name, component in components.items():
            if not (hasattr(component, "state_dict") and hasattr(component, "load_state_dict")):
                raise InvalidOptionType(name, f"component {name!r} ({type(component).__name__}) has no state_dict()/load_state_dict()")
            if name in (RNG_KEY, STEP_KEY, USER_KEY):
                raise InvalidOption(name, f"component name {name!r} is reserved")
        #: The store; ``None`` after :meth:`from_env` found none, until the first :meth:`save` creates it.
        self.store: Store | None = store
        self.components = components
        self.branch = branch or os.environ.get(BRANCH_ENV) or None
        self.user: dict[str, Any] = {}
        self._ref = ref
        self._url: str | None = None  # set by from_env: where save creates the store
        self._owns_store = False

    @property
    def ref(self) -> str:
        """What :meth:`resume` restores from: ``ref``, else ``$CKPTSTORE_REF``, else the head
        of :attr:`branch` (else of the store's default branch); never ``latest``."""
        return resume_ref(self.store, ref=self._ref, branch=self.branch)

    @classmethod
    def from_env(cls, url: str | None = None, *, ref: str | None = None, branch: str | None = None, **components: Any) -> Checkpointer:
        """A checkpointer on the store at ``url``, else ``$CKPTSTORE_URL``, else ``./ckpts``:
        a relaunched job resumes on a new machine without code changes, from S3 say, given
        the same environment. A missing store is not created here: :meth:`resume` says so
        and starts fresh, and the first :meth:`save` creates it."""
        url = url or os.environ.get(URL_ENV) or "ckpts"
        try:
            store: Store | None = open_store(url, create=False)
        except StoreNotFound:
            store = None
        checkpointer = cls(store, ref=ref, branch=branch, **components)  # type: ignore[arg-type]
        checkpointer._url = url
        checkpointer._owns_store = True
        return checkpointer

    def close(self) -> None:
        """Wait for asynchronous saves to land, raising the error of one that failed unseen;
        close the store if this checkpointer opened it (:meth:`from_env`). Idempotent. (A
        save still pending when the process exits is finished then anyway.)"""
        if self.store is None:
            return
        if self._owns_store:
            self.store.close()
        else:
            self.store.flush()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state(self, step: int) -> dict[str, Any]:
        """What :meth:`save` commits."""
        return {**self.components, RNG_KEY: capture_rng_state(), STEP_KEY: step, USER_KEY: self.user}

    def save(self, step: int, *, metrics: Mapping[str, float] | None = None, message: str = "", blocking: bool = True, **commit_options: Any) -> Any:
        """Commit every component, the RNG states, ``step`` and :attr:`user` (``step`` also
        goes into the metadata) to :attr:`branch`, creating the store of :meth:`from_env` if
        it is missing. Returns the :class:`Commit` (or, with ``blocking=False``, its
        future)."""
        if self.store is None:
            assert self._url is not None  # only from_env leaves the store unopened
            self.store = open_store(self._url)
        metadata = {STEP_KEY: step, **dict(commit_options.pop("metadata", None) or {})}
        return self.store.commit(
            self.state(step), branch=self.branch, message=message or f"step {step}", metadata=metadata,
            metrics=metrics, blocking=blocking, **commit_options,
        )  # fmt: skip

    def resume(self) -> int:
        """Restore every component in place, the RNG states and :attr:`user` from
        :attr:`ref` and return the saved step; if there is no store or no such ref, change
        nothing, create nothing and return 0 (a fresh start, logged).

        Every component is required (a commit without one raises
        :class:`ComponentsUnavailable` naming it, and nothing is restored); the RNG states,
        step and user dict are restored where the commit has them, so a plain
        ``store.commit({"model": ..., "step": ...})`` resumes too (the RNGs are then left as
        they are, with a warning, and the step comes from the commit's metadata, else 0)."""
        if self.store is None:
            try:
                self.store = open_store(self._url or "ckpts", create=False)  # made since from_env?
            except StoreNotFound:
                log.info("no store at %s: starting fresh", self._url)
                return 0
        ref = self.ref
        try:
            commit = self.store.commit_of(ref)
        except UnknownRef:
            log.info("no %r in %s: starting fresh", ref, self.store.url)
            return 0
        extras = [RNG_KEY, STEP_KEY, USER_KEY]
        try:
            state = self.store.checkout(commit.id, include=[*self.components, *extras])
        except ComponentsUnavailable as exc:
            required = [name for name in exc.missing if name in self.components]
            if exc.dropped or required:
                raise ComponentsUnavailable(commit.id, missing=required, dropped=exc.dropped, available=exc.available) from None
            extras = [name for name in extras if name not in exc.missing]
            state = self.store.checkout(commit.id, include=[*self.components, *extras])
        for name, component in self.components.items():
            component.load_state_dict(state[name])
        if RNG_KEY in state:
            restore_rng_state(state[RNG_KEY])
        else:
            log.warning(
                "commit %s (%s) has no RNG states: the RNGs are left as they are, so the run will not repeat an uninterrupted one bit for bit",
                commit.short_id,
                ref,
            )
        self.user = dict(state.get(USER_KEY) or {})
        step = state.get(STEP_KEY, commit.metadata.get(STEP_KEY, 0))
        if STEP_KEY not in state:
            log.info("commit %s (%s) has no %r component: the step is %d, from its metadata or 0", commit.short_id, ref, STEP_KEY, int(step))
        step = int(step)
        log.info("resumed from %s (%s) at step %d", ref, commit.short_id, step)
        return step
