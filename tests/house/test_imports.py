"""The house rules on imports (DESIGN.md section 3): no cycles, and imports point down the data flow."""

from __future__ import annotations

import import_graph as g

# Higher layers may import lower ones, never the reverse. model/ and media/ sit side by side.
# wave_rt.config is the model's configuration (it selects recipes), so it sits with model/.
LAYERS = [("wave_rt.cli",), ("wave_rt.archive", "wave_rt.export"), ("wave_rt.embed",),
          ("wave_rt.model", "wave_rt.config", "wave_rt.media"), ("wave_rt.kernels",)]
# Shared leaves: errors, item types, dtype names, optional-dependency loading, reading text manifests.
LEAVES = {"wave_rt.errors", "wave_rt.items", "wave_rt.dtypes", "wave_rt._optional", "wave_rt.manifest_text"}


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_graph_sees_the_whole_package():
    edges = g.graph()
    assert {"wave_rt.cli", "wave_rt.archive.job", "wave_rt.embed.encoder", "wave_rt.kernels"} <= set(edges)
    # function-level imports count: job imports the Ray engine only inside a function
    assert "wave_rt.archive.ray_engine" in edges["wave_rt.archive.job"]


def test_no_import_cycles():
    assert g.cycles(g.graph()) == []


def test_cycle_finder_finds_a_hidden_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert g.cycles(edges) == [["a", "b", "c"]]


def test_imports_point_down_the_data_flow():
    up = []
    for src, targets in g.graph().items():
        for dst in targets:
            ls, ld = _layer(src), _layer(dst)
            if src in LEAVES and dst not in LEAVES:
                up.append(f"{src} -> {dst} (a shared leaf imports the package above it)")
            elif ls is not None and ld is not None and ld < ls:
                up.append(f"{src} -> {dst}")
    assert up == []
