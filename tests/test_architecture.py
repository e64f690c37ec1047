"""The layering of ``orchestrator/``, checked by ``python -m pytest``.

The contracts are in pyproject.toml (``[tool.importlinter]``); the first test runs them with
import-linter, as ``lint-imports`` run from the repository root does. The second test fails on
any import cycle between modules of the package. TYPE_CHECKING imports count in both: a cycle
that only type checkers follow is still a cycle in the design.

``BothSidesContract`` is the contract type behind "only the wiring imports both sides": no
built-in import-linter type says "not both".
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import grimp
from importlinter import Contract, ContractCheck, configuration, fields, output
from importlinter.application import use_cases
from importlinter.domain.contract import InvalidContractOptions
from importlinter.domain.imports import Module

PACKAGE = "orchestrator"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


class BothSidesContract(Contract):
    """Only ``allowed_importers`` import more than one of ``sides`` directly.

    The importers are the children of the root package (a subpackage with all its modules, or a
    top-level module) and the root package's own ``__init__``; ``sides`` and
    ``allowed_importers`` are such children. Indirect imports do not count: whatever uses the
    runtime reaches both sides through it, and that is the point of the runtime.
    """

    type_name = "both_sides"

    sides = fields.ListField(subfield=fields.ModuleField())
    allowed_importers = fields.ListField(subfield=fields.ModuleField())

    def validate(self) -> None:
        roots = self.session_options["root_packages"]
        for option in ("sides", "allowed_importers"):
            for module in getattr(self, option):
                if module.parent.name not in roots:
                    raise InvalidContractOptions(
                        {option: f"{module.name} is not a child of a root package."}
                    )

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        sides = [module.name for module in cast("list[Module]", self.sides)]
        allowed = {module.name for module in cast("list[Module]", self.allowed_importers)}
        broken: dict[str, dict[str, list[str]]] = {}
        for root in self.session_options["root_packages"]:
            for importer in [root, *sorted(graph.find_children(root))]:
                if importer in allowed or importer in sides:
                    continue
                modules = {importer} if importer == root else _package(graph, importer)
                reached = {side: _imports(graph, modules, _package(graph, side)) for side in sides}
                reached = {side: lines for side, lines in reached.items() if lines}
                if len(reached) > 1:
                    broken[importer] = reached
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, reached in check.metadata["broken"].items():
            output.print_error(f"{importer} imports {' and '.join(reached)}:")
            output.new_line()
            for lines in reached.values():
                for line in lines:
                    output.indent_cursor()
                    output.print(line)
            output.new_line()


def _package(graph: grimp.ImportGraph, name: str) -> set[str]:
    return {name} | graph.find_descendants(name)


def _imports(graph: grimp.ImportGraph, importers: set[str], imported: set[str]) -> list[str]:
    """Each direct import from ``importers`` into ``imported``, as 'a -> b (l. N)'."""
    return [
        f"{detail['importer']} -> {detail['imported']} (l. {detail['line_number']})"
        for importer in sorted(importers)
        for target in sorted(graph.find_modules_directly_imported_by(importer) & imported)
        for detail in graph.get_import_details(importer=importer, imported=target)
    ]


def test_layering_contracts_are_kept() -> None:
    configuration.configure()
    kept = use_cases.lint_imports(
        config_filename=str(PYPROJECT), cache_dir=None, is_debug_mode=True, no_logo=True
    )
    assert kept, "a layering contract in pyproject.toml is broken: see the captured stdout"


def _cycle(graph: grimp.ImportGraph, importer: str, imported: str) -> tuple[str, ...] | None:
    """The shortest cycle through the direct import ``importer -> imported``, if any.

    The cycle is given without its closing module: ``imported, ..., importer``.
    """
    back: tuple[str, ...] | None = graph.find_shortest_chain(importer=imported, imported=importer)
    return back


def _rotated(cycle: tuple[str, ...]) -> tuple[str, ...]:
    """The cycle (without its closing module) starting at its smallest module: one key each."""
    start = cycle.index(min(cycle))
    return cycle[start:] + cycle[:start]


def _describe(graph: grimp.ImportGraph, cycle: tuple[str, ...]) -> str:
    steps = []
    for importer, imported in zip(cycle, (*cycle[1:], cycle[0]), strict=True):
        details = graph.get_import_details(importer=importer, imported=imported)
        lines = ", ".join(str(detail["line_number"]) for detail in details)
        steps.append(f"  {importer} -> {imported} (l. {lines})")
    return "\n".join(steps)


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(PACKAGE, cache_dir=None, exclude_type_checking_imports=False)
    # orchestrator/agents and orchestrator/schemas are symlinks: the graph must follow them.
    assert {"orchestrator.agents.support", "orchestrator.schemas.envelope"} <= graph.modules
    cycles: dict[tuple[str, ...], str] = {}
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            cycle = _cycle(graph, importer, imported)
            if cycle is not None and _rotated(cycle) not in cycles:
                cycles[_rotated(cycle)] = _describe(graph, _rotated(cycle))
    if cycles:
        raise AssertionError("import cycles in orchestrator/:\n\n" + "\n\n".join(cycles.values()))
