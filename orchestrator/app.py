"""The application object: registers agents, tools, pipelines and offline model rules.

Loaded by the CLI as ``module:attr`` (as uvicorn and Celery do), so a user's
agents run on the same runtime without touching it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from orchestrator.errors import ConfigurationError, InvalidInput
from orchestrator.models.llm import OfflineRule
from orchestrator.step.tools import ToolFn, ToolSpec
from orchestrator.store.schedules import CatchUp, Schedule

if TYPE_CHECKING:
    from orchestrator.step.agent import Agent

# A hook gets the opened Runtime (typed loosely: the runtime module imports this one).
SetupHook = Callable[[Any], Awaitable[None]]
A = TypeVar("A", bound="type[Agent[Any, Any]]")
F = TypeVar("F", bound=ToolFn)


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A named route through agents, and the input a workflow of it starts from."""

    name: str
    agents: tuple[str, ...]
    input_model: type[BaseModel] | None = None  # None: any JSON object
    input_key: str = "input"  # where the input sits in the workflow state
    from_text: Callable[[str], BaseModel] | None = None  # plain text -> input (the CLI)
    max_steps: int | None = None  # None: the ``max_steps`` setting
    # Completed workflows are distilled into long-term memory (orchestrator.memory).
    consolidate: bool = False

    def validate_input(self, value: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
        """The input as JSON, checked against ``input_model``; InvalidInput when it does not fit."""
        model = self.input_model
        try:
            if model is None:
                data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
                return dict(json.loads(json.dumps(data)))
            checked = (
                value
                if isinstance(value, model)
                else model.model_validate(
                    value.model_dump() if isinstance(value, BaseModel) else value
                )
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "input"
            wanted = model.__name__ if model else "JSON"
            raise InvalidInput(
                f"input of pipeline {self.name!r} does not fit {wanted} ({where}: {first['msg']})"
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"input of pipeline {self.name!r} is not JSON: {exc}") from exc
        return checked.model_dump(mode="json")


class App:
    """The application: its agents, tools, pipelines, schedules, offline model rules and setup
    hooks (loaded by the CLI as ``module:attr``)."""

    def __init__(self, name: str, *, version: str = "0") -> None:
        self.name = name
        self.version = version
        self.agents: dict[str, type[Agent[Any, Any]]] = {}
        self.tools: dict[str, ToolSpec] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.schedules: dict[str, Schedule] = {}
        self.offline_rules: dict[str, OfflineRule] = {}
        self.setup_hooks: list[SetupHook] = []
        self.default_pipeline: str | None = None

    def agent(self, cls: A, *, replace: bool = False) -> A:
        """Register an agent class (``@app.agent``). ``app.agent(cls, replace=True)`` puts
        a subclass in place of an agent of the same name (one taken in by ``include``)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigurationError(
                f"agent {cls.__name__} needs a name of letters, digits, - or _"
            )
        if name in self.agents and not replace:
            raise ConfigurationError(f"agent {name!r} is registered twice")
        if replace and name not in self.agents:
            raise ConfigurationError(f"agent {name!r} replaces nothing")
        self.agents[name] = cls
        return cls

    def include(self, other: App) -> None:
        """Take in every agent, tool, pipeline, schedule, offline rule and setup hook of
        ``other`` (the built-in support app, say); a name registered twice is an error."""
        for name, cls in other.agents.items():
            if name in self.agents:
                self._twice("agent", name)
            self.agents[name] = cls
        for name, spec in other.tools.items():
            if name in self.tools:
                self._twice("tool", name)
            self.tools[name] = spec
        for name, pipeline in other.pipelines.items():
            if name in self.pipelines:
                self._twice("pipeline", name)
            self.pipelines[name] = pipeline
        for name, schedule in other.schedules.items():
            if name in self.schedules:
                self._twice("schedule", name)
            self.schedules[name] = schedule
        self.default_pipeline = self.default_pipeline or other.default_pipeline
        self.offline_rules = {**other.offline_rules, **self.offline_rules}
        self.setup_hooks.extend(other.setup_hooks)

    @staticmethod
    def _twice(kind: str, name: str) -> None:
        raise ConfigurationError(f"{kind} {name!r} is registered twice")

    @overload
    def tool(self, fn: F, /) -> F: ...

    @overload
    def tool(
        self,
        *,
        name: str | None = None,
        idempotent: bool = True,
        reconcile: ToolFn | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        idempotent: bool = True,
        reconcile: ToolFn | None = None,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        """Register an async tool: ``@app.tool`` or ``@app.tool(idempotent=False)``.

        A call of a non-idempotent tool that started but has no recorded result
        (its worker died, or it raised anything but ``ToolNotApplied``) is never
        re-run blindly: with ``reconcile`` it is checked, otherwise the step is
        dead-lettered as in doubt. A tool taking ``idempotency_key`` and
        ``fencing_token`` gets both on every call; ``timeout`` bounds each call.
        """

        def register(f: F) -> F:
            tool_name = name or f.__name__
            probe: Any = f  # keeps mypy from narrowing f away from F
            if not inspect.iscoroutinefunction(probe):
                raise ConfigurationError(f"tool {tool_name!r} must be an async function")
            if tool_name in self.tools:
                raise ConfigurationError(f"tool {tool_name!r} is registered twice")
            params = inspect.signature(f).parameters
            takes_key = "idempotency_key" in params
            if reconcile is not None and idempotent:
                raise ConfigurationError(
                    f"tool {tool_name!r}: reconcile is for non-idempotent tools"
                )
            self.tools[tool_name] = ToolSpec(
                tool_name, f, idempotent, takes_key, reconcile, "fencing_token" in params, timeout
            )
            return f

        if fn is not None:
            return register(fn)
        return register

    def pipeline(
        self,
        name: str,
        agents: Sequence[str],
        *,
        input_model: type[BaseModel] | None = None,
        input_key: str = "input",
        from_text: Callable[[str], BaseModel] | None = None,
        max_steps: int | None = None,
        default: bool = False,
        consolidate: bool = False,
    ) -> Pipeline:
        """Declare a pipeline: its agents in their default order and the input it takes.

        A submitted input is validated against ``input_model`` and stored in the
        workflow state under ``input_key``, where the agents' input models read it.
        ``from_text`` turns a plain-text ``orchestrator submit "..."`` into an input.
        ``max_steps`` bounds the steps of one workflow (default: the ``max_steps``
        setting): a routing loop fails with ``StepLimitReached`` instead of running on.
        ``consolidate``: a completed workflow is distilled into the customer's long-term
        memory (a summary and the facts it taught), off the hot path.
        """
        if not agents:
            raise ConfigurationError(f"pipeline {name!r} has no agents")
        pipeline = Pipeline(
            name, tuple(agents), input_model, input_key, from_text, max_steps, consolidate
        )
        self.pipelines[name] = pipeline
        if default or self.default_pipeline is None:
            self.default_pipeline = name
        return pipeline

    def schedule(
        self,
        name: str,
        *,
        cron: str,
        pipeline: str,
        input: BaseModel | Mapping[str, Any],
        tenant: str = "default",
        catch_up: CatchUp = "latest",
        timezone: str = "UTC",
    ) -> Schedule:
        """Submit a workflow of ``pipeline`` on ``input`` at every tick of ``cron``.

        ``cron`` is a five-field expression (minute hour day-of-month month
        day-of-week) read in ``timezone``; a bad one raises ConfigurationError here.
        Each tick runs once however many runtimes tick. A schedule never fires for
        ticks before it was first seen; ticks missed while nothing ran collapse into
        one run for the latest of them, or with ``catch_up="all"`` each get a run (at
        most 100, the latest). See ``orchestrator.engine.schedules.tick``.
        """
        if name in self.schedules:
            self._twice("schedule", name)
        given = input if isinstance(input, BaseModel) else dict(input)
        declared = Schedule(name, cron, pipeline, given, tenant, catch_up, timezone)
        self.schedules[name] = declared
        return declared

    def offline_rule(self, purpose: str) -> Callable[[OfflineRule], OfflineRule]:
        """Register the offline model's rule for requests of ``purpose`` (used when no API key
        is set)."""

        def register(rule: OfflineRule) -> OfflineRule:
            self.offline_rules[purpose] = rule
            return rule

        return register

    def on_setup(self, hook: SetupHook) -> SetupHook:
        """Run ``hook(runtime)`` after migrations (seeding data, warming caches)."""
        self.setup_hooks.append(hook)
        return hook

    def validate(self) -> None:
        """Fail at startup, not at handoff, on a pipeline, tool or schedule that names
        nothing, or a schedule whose input does not fit its pipeline."""
        for schedule in self.schedules.values():
            self._validate_schedule(schedule)
        for pipeline, declared in self.pipelines.items():
            for agent in declared.agents:
                if agent not in self.agents:
                    raise ConfigurationError(f"pipeline {pipeline!r} names unknown agent {agent!r}")
        for agent_name, cls in self.agents.items():
            for tool in cls.tools:
                if tool not in self.tools:
                    raise ConfigurationError(f"agent {agent_name!r} uses unknown tool {tool!r}")
            for target in cls.routes:
                if target not in self.agents:
                    raise ConfigurationError(
                        f"agent {agent_name!r} routes to unknown agent {target!r}"
                    )

    def _validate_schedule(self, schedule: Schedule) -> None:
        if schedule.pipeline not in self.pipelines:
            raise ConfigurationError(
                f"schedule {schedule.name!r} names unknown pipeline {schedule.pipeline!r}"
            )
        try:
            self.pipelines[schedule.pipeline].validate_input(schedule.input)
        except InvalidInput as exc:
            raise ConfigurationError(f"schedule {schedule.name!r}: {exc}") from exc

    def resolve_pipeline(self, name: str | None) -> Pipeline:
        """The pipeline called ``name`` (the default one for None)."""
        chosen = name or self.default_pipeline
        if chosen is None or chosen not in self.pipelines:
            known = ", ".join(sorted(self.pipelines)) or "none"
            raise ConfigurationError(f"no pipeline {chosen!r} in app {self.name!r} (has {known})")
        return self.pipelines[chosen]

    def step_limit(self, pipeline: str, default: int) -> int:
        """The most steps a workflow of ``pipeline`` may run."""
        declared = self.pipelines.get(pipeline)
        return (declared.max_steps if declared else None) or default

    def consolidates(self, pipeline: str) -> bool:
        """Whether completed workflows of ``pipeline`` are distilled into long-term memory."""
        declared = self.pipelines.get(pipeline)
        return declared is not None and declared.consolidate

    @property
    def joins(self) -> frozenset[str]:
        """The agents declared as joins."""
        return frozenset(name for name, cls in self.agents.items() if cls.join)

    def optional_join(self, pipeline: str) -> str | None:
        """The join of ``pipeline`` that tolerates failed branches (an agent of it declared
        ``join`` and ``optional_branches``), if any: then a failed branch does not fail
        the workflow."""
        declared = self.pipelines.get(pipeline)
        for agent in declared.agents if declared else ():
            cls = self.agents.get(agent)
            if cls is not None and cls.join and cls.optional_branches:
                return agent
        return None

    def default_next(self, pipeline: str, agent: str) -> tuple[str, ...]:
        """The agent after ``agent`` in ``pipeline`` (none at its end)."""
        declared = self.pipelines.get(pipeline)
        agents = declared.agents if declared else ()
        if agent in agents:
            i = agents.index(agent)
            return agents[i + 1 : i + 2]
        return ()


def load_app(path: str) -> App:
    """Import ``module:attr`` and return the App it names.

    The current directory is importable first, as for uvicorn and celery, so
    ``--app mypkg.flows:app`` works from the project folder.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"--app must look like module:attr, got {path!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import app module {module_name!r}: {exc}") from exc
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ConfigurationError(f"{path!r} is not an orchestrator App")
    app.validate()
    return app
