"""Reads cuDNN's C headers and compares them with the prototype table and the enums.

Kept apart from the tests so a test can feed it a deliberately wrong prototype and see it fail.
"""

from __future__ import annotations

import ctypes
import re

HEADERS = ("cudnn_graph.h", "cudnn_ops.h")
# cudaStream_t comes from the CUDA runtime headers, which the cuDNN wheel does not ship.
EXTERNAL_POINTER_TYPES = {"cudaStream_t"}


def strip_c(text: str) -> str:
    """Remove comments and preprocessor lines, so that what is left is declarations."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def parse_headers(texts) -> tuple[dict, dict, set, set]:
    """Return (prototypes, enum members, enum type names, opaque pointer type names).

    prototypes: name -> (return type, [parameter types]) as C text with names removed.
    """
    source = "\n".join(strip_c(text) for text in texts)
    enum_types, enum_members = set(), {}
    for body, name in re.findall(r"typedef\s+enum\s*\w*\s*\{(.*?)\}\s*(\w+)", source, flags=re.S):
        enum_types.add(name)
        enum_members.update(_enum_values(body, enum_members))
    pointer_types = set(re.findall(r"typedef\s+struct\s+\w+\s*\*\s*(\w+)[\s\w]*;", source)) | EXTERNAL_POINTER_TYPES
    prototypes = {}
    for statement in source.split(";"):
        match = re.search(r"([\w\s\*]+?)\b(cudnn\w+)\s*\(([^()]*)\)\s*$", statement.strip(), flags=re.S)
        if not match or "typedef" in statement:
            continue
        return_type, name, parameters = match.groups()
        return_type = " ".join(w for w in return_type.split() if w not in ("CUDNNWINAPI", "CUDNN_DEPRECATED", "extern"))
        params = [] if parameters.strip() in ("", "void") else [_without_name(p) for p in parameters.split(",")]
        prototypes[name] = (return_type.strip(), params)
    return prototypes, enum_members, enum_types, pointer_types


def _enum_values(body: str, known: dict) -> dict:
    values, next_value = {}, 0
    for entry in body.split(","):
        entry = entry.replace("CUDNN_DEPRECATED_ENUM", " ").strip()
        if not entry:
            continue
        name, _, value = (part.strip() for part in entry.partition("="))
        if value:
            next_value = _evaluate(value, {**known, **values})
        values[name] = next_value
        next_value = None if next_value is None else next_value + 1
    return values


def _evaluate(expression: str, names: dict):
    """An enum initializer: integer literals (U/L suffixes), known names, | << + - ( ); None if other."""
    expression = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expression)
    expression = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: str(names.get(m.group(0), "?")), expression)
    if not re.fullmatch(r"[0-9a-fA-Fx\s|<>+\-()~&]*", expression):
        return None
    return int(eval(expression, {"__builtins__": {}}))  # only digits and operators remain


def _without_name(parameter: str) -> str:
    parameter = " ".join(parameter.split())
    array = parameter.endswith("[]")
    parameter = parameter[:-2].strip() if array else parameter
    parameter = re.sub(r"\b\w+$", "", parameter).strip()  # drop the parameter's own name
    return parameter + ("*" if array else "")


def c_kind(c_type: str, enum_types: set, pointer_types: set) -> str:
    """pointer / int / double / float / size_t / void for a C type."""
    bare = c_type.replace("const", " ").strip()
    if "*" in bare:
        return "pointer"
    bare = bare.strip()
    if bare in pointer_types:
        return "pointer"
    if bare in enum_types or bare == "int":
        return "int"
    if bare in ("double", "float", "size_t", "void"):
        return bare
    raise ValueError(f"unclassified C type {c_type!r}")


def ctypes_kind(ctype) -> str:
    """The same kinds for a ctypes type (None is void)."""
    if ctype is None:
        return "void"
    if ctype is ctypes.c_size_t:
        return "size_t"
    if ctype in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(ctype, (ctypes._Pointer,)):
        return "pointer"
    if ctype is ctypes.c_int:
        return "int"
    if ctype is ctypes.c_double:
        return "double"
    if ctype is ctypes.c_float:
        return "float"
    raise ValueError(f"unclassified ctypes type {ctype!r}")


def conformance_problems(prototypes_table: dict, header_texts) -> list[str]:
    """Every disagreement between the table and the headers (empty when they agree)."""
    prototypes, _, enum_types, pointer_types = parse_headers(header_texts)
    problems = []
    for name, (restype, argtypes) in prototypes_table.items():
        if name not in prototypes:
            problems.append(f"{name}: not declared in the headers")
            continue
        c_return, c_params = prototypes[name]
        if len(c_params) != len(argtypes):
            problems.append(f"{name}: {len(argtypes)} parameters in the table, {len(c_params)} in the header")
            continue
        expected = c_kind(c_return, enum_types, pointer_types)
        if ctypes_kind(restype) != expected:
            problems.append(f"{name}: returns {ctypes_kind(restype)} in the table, "
                            f"{expected} ({c_return}) in the header")
        for index, (ctype, c_param) in enumerate(zip(argtypes, c_params)):
            expected = c_kind(c_param, enum_types, pointer_types)
            if ctypes_kind(ctype) != expected:
                problems.append(f"{name}: parameter {index} is {ctypes_kind(ctype)} in the table, "
                                f"{expected} ({c_param}) in the header")
    return problems
