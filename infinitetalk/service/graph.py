"""Fill a shipped API-format workflow with a job's parameters.

Convention (shared with `workflows/api/*_api.json`): a parameter P sets the literal input named P of the
node titled P (`_meta.title`), or else of the node that has a literal input named P. A parameter left
out of the job removes its titled node and the links to it (those inputs are optional in the graph).
Every output node with a `filename_prefix` input gets the job's prefix so its files are found later, and
stores no graph in its files: a hosted output is the customer's video, not the server's workflow (whose input
paths and job ids it would reveal), and the same request makes the same file.
"""
from __future__ import annotations

import copy
from typing import Any

from .contract import ApiError


# Output nodes' switch for storing the graph in their files (core's savers follow --disable-metadata only).
_GRAPH_SWITCHES = {"InfiniteTalkVideoCombine": "embed_workflow"}

# The input a titled loader node takes its value in, when it has several literal inputs.
_VALUE_INPUTS = ("image", "audio", "video", "file", "value", "text")


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _literal_inputs(node: dict) -> list[str]:
    return [k for k, v in (node.get("inputs") or {}).items() if not _is_link(v)]


def parameter_slots(graph: dict) -> dict[str, tuple[str, str]]:
    """parameter name -> (node id, input name) for every parameter the graph exposes."""
    slots: dict[str, tuple[str, str]] = {}
    for node_id, node in graph.items():
        title = (node.get("_meta") or {}).get("title")
        literals = _literal_inputs(node)
        if not title:
            continue
        if title in literals:
            slots[title] = (node_id, title)
        elif title not in slots:
            usual = [k for k in literals if k in _VALUE_INPUTS]
            if len(literals) == 1 or len(usual) == 1:
                slots[title] = (node_id, literals[0] if len(literals) == 1 else usual[0])
    titles = {(n.get("_meta") or {}).get("title") for n in graph.values()}
    for node_id, node in graph.items():
        title = (node.get("_meta") or {}).get("title")
        for name in _literal_inputs(node):
            if title in titles and title in slots and title != name:
                continue  # a loader titled for another parameter (e.g. mask_image's LoadImage.image)
            slots.setdefault(name, (node_id, name))
    return slots


def _remove_node(graph: dict, node_id: str) -> None:
    graph.pop(node_id, None)
    for node in graph.values():
        inputs = node.get("inputs") or {}
        for key in [k for k, v in inputs.items() if _is_link(v) and v[0] == node_id]:
            del inputs[key]


def build_graph(template: dict, params: dict[str, Any], optional: tuple[str, ...] = ("mask_image",),
                filename_prefix: str | None = None) -> dict:
    """A new graph with `params` written in; `optional` parameters absent from `params` are removed."""
    graph = copy.deepcopy(template)
    slots = parameter_slots(graph)
    for name in optional:
        if params.get(name) is None:
            for node_id in [i for i, n in graph.items() if (n.get("_meta") or {}).get("title") == name]:
                _remove_node(graph, node_id)
    slots = parameter_slots(graph)
    for name, value in params.items():
        if value is None:
            continue
        if name not in slots:
            raise ApiError(500, f"the shipped workflow has no input for parameter '{name}'")
        node_id, input_name = slots[name]
        graph[node_id]["inputs"][input_name] = value
    if filename_prefix:
        for node in graph.values():
            if "filename_prefix" in (node.get("inputs") or {}):
                node["inputs"]["filename_prefix"] = filename_prefix
                if node.get("class_type") in _GRAPH_SWITCHES:
                    node["inputs"][_GRAPH_SWITCHES[node["class_type"]]] = False
    return graph
