"""Plain text from man-page roff source (enough for language-modelling text, no groff needed)."""

from __future__ import annotations

import re

# Macros whose arguments are running text.
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "TQ", "UR", "MT", "Nm", "Nd"}
_ALTERNATING_MACROS = {"BR", "BI", "IB", "IR", "RB", "RI"}  # arguments joined without spaces
_PARAGRAPH_MACROS = {"PP", "P", "LP", "TP", "IP", "HP", "SH", "SS", "sp", "br", "RS", "RE", "EX", "EE", "nf", "fi"}
_NAMED_CHARACTERS = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "bu": "•",
    "co": "©", "rg": "®", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "ga": "`", "ti": "~", "ha": "^",
    "rs": "\\", "sl": "/", "lB": "[", "rB": "]", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "de": "°",
    "mu": "×", "tm": "™", "Po": "£", "Eu": "€", "ss": "ß", "12": "½", "14": "¼", "34": "¾", "<=": "≤",
    ">=": "≥", "->": "→", "<-": "←", "!=": "≠", "+-": "±",
}
_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"  # font changes
    r"|s[+-]?\d+|s\(\d\d|s\[[^\]]*\]"  # size changes
    r"|\((?P<two>..)|\[(?P<name>[^\]]*)\]"  # named characters
    r"|\*(?:\(..|\[[^\]]*\]|.)"  # strings
    r"|[hvwlLDoxXkbNmMYzZ](?:'[^']*'|\[[^\]]*\]|.)?"  # motions and other escapes with an argument
    r"|n[+-]?(?:\(..|\[[^\]]*\]|.)"  # number registers
    r"|(?P<char>.)"
    r")"
)
_SIMPLE = {"-": "-", " ": " ", "~": " ", "e": "\\", "\\": "\\", "'": "'", "`": "`", ".": ".", "0": " ", "|": "",
           "^": "", "&": "", ",": "", "/": "", ":": "", "%": "", "c": "", "p": "", "t": "\t", "!": "", "{": "",
           "}": ""}


def _replace_escape(match: re.Match) -> str:
    if match.group("two") is not None:
        return _NAMED_CHARACTERS.get(match.group("two"), "")
    if match.group("name") is not None:
        name = match.group("name")
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _NAMED_CHARACTERS.get(name, "")
    if match.group("char") is not None:
        return _SIMPLE.get(match.group("char"), "")
    return ""


def _inline(text: str) -> str:
    return _ESCAPE.sub(_replace_escape, text)


def _macro_arguments(rest: str) -> list[str]:
    """Arguments of a macro; a quoted argument keeps its spaces."""
    words = re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)
    return [(quoted or bare).replace('""', '"') for quoted, bare in words]


def roff_to_text(source: str) -> str:
    """Render man(7) roff to plain paragraphs: macros dropped, text and macro arguments kept, escapes resolved."""
    paragraphs: list[list[str]] = [[]]
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].lstrip().partition(" ")
            if macro in _PARAGRAPH_MACROS and paragraphs[-1]:
                paragraphs.append([])
            if macro in _TEXT_MACROS and rest.strip():
                words = _macro_arguments(rest)
                paragraphs[-1].append(_inline("".join(words) if macro in _ALTERNATING_MACROS else " ".join(words)))
            continue
        text = _inline(line)
        if text.strip():
            paragraphs[-1].append(text.strip())
    rendered = (" ".join(p) for p in paragraphs if p)
    return "\n\n".join(re.sub(r"[ \t]+", " ", p).strip() for p in rendered)
