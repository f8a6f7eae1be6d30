"""Plain text from man-page roff (man(7), with enough mdoc(7) and tbl(1)); no groff needed.

Deterministic and good enough for language-modelling text: comment lines, macro definitions and layout
requests are dropped; headings, tags and the text arguments of font macros are kept; escapes are resolved
(fonts and motions removed, named characters and strings turned into the characters they stand for).
Output: paragraphs separated by blank lines; headings, list tags and no-fill (example) lines on lines of
their own.
"""

from __future__ import annotations

import re
import unicodedata

_GREEK = dict(zip("abgdezyhiklmncoprstufxqwABGDEZYHIKLMNCOPRSTUFXQW",
                  "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ"))
_NAMED_CHARACTERS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "Bq": "„", "bq": "‚", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "ci": "○",
    "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "di": "÷", "pl": "+", "eq": "=", "+-": "±",
    "ga": "`", "aa": "´", "ti": "~", "ha": "^", "a~": "~", "a^": "^", "rs": "\\", "sl": "/", "ba": "|",
    "br": "│", "bv": "|", "or": "|", "at": "@", "sh": "#", "Do": "$", "ct": "¢", "Po": "£", "Eu": "€",
    "eu": "€", "Ye": "¥", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "<=": "≤",
    ">=": "≥", "!=": "≠", "==": "≡", "~~": "≈", "->": "→", "<-": "←", "<>": "↔", "if": "∞", "is": "∫",
    "pd": "∂", "sr": "√", "fa": "∀", "te": "∃", "mo": "∈", "no": "¬", "AN": "∧", "OR": "∨", "ss": "ß",
    "12": "½", "14": "¼", "34": "¾", "S1": "¹", "S2": "²", "S3": "³", "mc": "µ", "ps": "¶", "sc": "§",
    "oe": "œ", "OE": "Œ", "ae": "æ", "AE": "Æ", "/o": "ø", "/O": "Ø", "ao": "å", "AO": "Å", "-D": "Đ",
    "Sd": "ð", "TP": "Þ", "Tp": "þ", "ul": "_", "ru": "_", "sq": "□", "dg": "†", "dd": "‡", "lh": "☜",
    "rh": "☞", "OK": "✓", "hA": "⇔", "rA": "⇒", "lA": "⇐", "ua": "↑", "da": "↓", "Im": "ℑ", "Re": "ℜ",
    "es": "∅", "ap": "∼", "pt": "∝", "st": "∋", "sb": "⊂", "sp": "⊃", "ca": "∩", "cu": "∪", "gr": "∇",
    "tf": "∴", "pp": "⊥", "an": "∠", "md": "·", "pc": "·", "r!": "¡", "r?": "¿", "fm": "′", "sd": "″",
}
_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303", ",": "\u0327",
            "v": "\u030c", "o": "\u030a", "u": "\u0306", "-": "\u0304", ".": "\u0307", '"': "\u030b"}
# Strings the man/mdoc packages and pod2man/po4a preambles define, as nroff renders them.
_DEFAULT_STRINGS = {
    "lq": "“", "rq": "”", "Aq": "'", "R": "®", "Tm": "™", "S": "", "HF": "", "Lq": "“", "Rq": "”",
    'L"': "“", 'R"': "”", "C`": '"', "C'": '"', "C+": "C++", "PI": "π", "Gt": ">", "Lt": "<", "Le": "≤",
    "Ge": "≥", "Ne": "≠", "Pm": "±", "If": "∞", "Na": "NaN", "Ba": "|", "Am": "&", "Pi": "π", "q": '"',
    "la": "«", "ra": "»", "Tr": "", "m1": "", "sd": "",
}
_SIMPLE_ESCAPES = {
    "-": "-", " ": " ", "~": " ", "0": " ", "e": "\\", "E": "\\", "\\": "\\", "'": "'", "`": "`", ".": ".",
    "t": " ", "|": "", "^": "", "&": "", ")": "", ",": "", "/": "", ":": "", "%": "", "c": "", "p": "",
    "!": "", "{": "", "}": "", "u": "", "d": "", "r": "", "a": "", "z": "", "\n": "",
}

_ESCAPE = re.compile(
    r"""\\(?:
      \\(?:f[BIRP]|,(?=\w)|/(?=\\f))                   # a doubled font escape (a translation slip): dropped
    | [fFmM](?:\[[^\]]*\]|\(..|.)                       # font, family, colour
    | s(?:[+-]?\d|[+-]?\(\d\d|[+-]?\[[^\]]*\]|[+-]?'[^']*')  # point size
    | \((?P<two>..) | \[(?P<name>[^\]]*)\] | C'(?P<cname>[^']*)'   # named characters
    | \*(?:\((?P<s2>..)|\[(?P<sname>[^\]\s]*)[^\]]*\]|(?P<s1>[^(\[]))   # strings
    | N'(?P<code>\d+)'                                   # character by code
    | n[+-]?(?:\(..|\[[^\]]*\]|.)                       # number register
    | \$(?:\(..|\[[^\]]*\]|[*@^]|\d)                    # macro argument
    | [hvwlLDoxXbZSHRABTY](?:'[^']*'|\[[^\]]*\])          # escapes with a delimited argument
    | [kgVjO](?:\(..|\[[^\]]*\]|.)                       # escapes with a name argument
    | (?P<char>.)
    | $
    )""",
    re.X,
)


def _named_character(name: str) -> str:
    if name in _NAMED_CHARACTERS:
        return _NAMED_CHARACTERS[name]
    if len(name) == 2 and name[0] == "*" and name[1] in _GREEK:
        return _GREEK[name[1]]
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}(?:_[0-9A-Fa-f]{4,6})*", name):
        return unicodedata.normalize("NFC", "".join(chr(int(code, 16)) for code in name[1:].split("_")))
    if re.fullmatch(r"char\d{1,3}", name):
        return chr(int(name[4:]))
    return ""


class _Renderer:
    def __init__(self) -> None:
        self.blocks: list[list[str]] = []  # paragraphs, each a list of output lines
        self.lines: list[str] = []  # lines of the paragraph being built
        self.words: list[str] = []  # pieces of the line being built
        self.glue = False  # the next piece joins the last one without a space (\c)
        self.fill = True
        self.pending_tag = False  # the next text is a list tag (after .TP / .TQ): a line of its own
        self.pending_heading = False  # the next text is a heading (.SH without arguments)
        self.strings = dict(_DEFAULT_STRINGS)
        self.links: list[str] = []  # open .UR / .MT targets
        self.skip_until: str | None = None  # inside .de/.am/.ig: the name ending it ("." for `..`)
        self.conditions: list[bool] = []  # open \{ ... \} blocks: whether their lines count
        self.last_condition = True  # for .el
        self.table: str | None = None  # None, "format" or "data" inside .TS/.TE
        self.table_tab = "\t"
        self.table_block = False  # inside T{ ... T}
        self.mdoc_name = ""

    # output ----------------------------------------------------------------------------------------------
    def add(self, text: str, *, raw: bool = False, glue_after: bool = False) -> None:
        """Add text to the current line (fill mode) or as a line of its own (no-fill mode, tables)."""
        if not raw:
            text = self.inline(text)
        no_fill = not self.fill and self.table is None
        text = text.rstrip() if no_fill else " ".join(text.split())
        if text or no_fill:
            if self.glue and self.words:
                self.words[-1] += text
            else:
                self.words.append(text)
        self.glue = glue_after
        if glue_after or not (text or no_fill):
            return
        if no_fill:
            self.line_break(keep_empty=True)
        if self.pending_heading:
            self.pending_heading = False
            self.paragraph()
        elif self.pending_tag:
            self.pending_tag = False
            self.line_break()

    def line_break(self, keep_empty: bool = False) -> None:
        if self.words:
            line = " ".join(w for w in self.words if w)
            if line.strip() or (keep_empty and self.lines):
                self.lines.append(line.rstrip() if not self.fill and self.table is None else line.strip())
        self.words = []
        self.glue = False

    def paragraph(self) -> None:
        self.line_break()
        while self.lines and not self.lines[-1].strip():
            self.lines.pop()
        if self.lines:
            self.blocks.append(self.lines)
        self.lines = []

    def text(self) -> str:
        self.paragraph()
        return "\n\n".join("\n".join(lines) for lines in self.blocks)

    # escapes ---------------------------------------------------------------------------------------------
    def inline(self, text: str) -> str:
        return _ESCAPE.sub(self._escape, text)

    def _escape(self, match: re.Match) -> str:
        if match.group("two") is not None:
            return _named_character(match.group("two"))
        if match.group("name") is not None:
            return _named_character(match.group("name"))
        if match.group("cname") is not None:
            return _named_character(match.group("cname"))
        for group in ("s2", "sname", "s1"):
            if match.group(group) is not None:
                return self.inline(self.strings.get(match.group(group), ""))
        if match.group("code") is not None:
            code = int(match.group("code"))
            return chr(code) if 32 <= code < 0x110000 else ""
        char = match.group("char")
        if char is not None:
            return _SIMPLE_ESCAPES.get(char, char)
        return ""

    # lines -----------------------------------------------------------------------------------------------
    def feed(self, line: str) -> None:
        if self.skip_until is not None:
            if line[:1] in {".", "'"} and line[1:].strip() == self.skip_until:
                self.skip_until = None
            return
        closes = line.count("\\}")
        line = line.replace("\\}", "")
        if all(self.conditions):
            self._line(line)
        else:  # a skipped line still opens and closes blocks
            self.conditions.extend([False] * line.count("\\{"))
        for _ in range(min(closes, len(self.conditions))):
            self.conditions.pop()

    def _line(self, line: str) -> None:
        if line.startswith((".", "'")):
            self._request(line[1:])
            return
        if self.table is not None:
            self._table_line(line)
            return
        if not line.strip():
            if self.fill:
                self.paragraph()
            else:
                self.line_break()
                if self.lines and self.lines[-1]:
                    self.lines.append("")
            return
        if self.fill and line[0] in " \t":
            self.line_break()  # a line starting with space breaks the line
        glue_next = line.endswith("\\c") and not line.endswith("\\\\c")
        self.add(line[:-2] if glue_next else line, glue_after=glue_next)

    def _table_line(self, line: str) -> None:
        stripped = line.strip()
        if self.table == "format":
            if stripped.endswith(";"):
                tab = re.search(r"tab\s*\((.)\)", stripped)
                if tab:
                    self.table_tab = tab.group(1)
            elif stripped.endswith("."):
                self.table = "data"
            return
        if self.table_block:
            if stripped.startswith("T}"):
                self.table_block = False
                rest = stripped[2:].lstrip(self.table_tab)
                if rest:
                    self._table_row(rest)
                else:
                    self.line_break()
            else:
                self.add(line)
            return
        if stripped in {"_", "=", "\\_", "\\="} or not stripped:
            return
        self._table_row(line)

    def _table_row(self, line: str) -> None:
        cells = line.split(self.table_tab)
        if cells and cells[-1].strip() == "T{":
            cells = cells[:-1]
            self.table_block = True
        for cell in cells:
            if cell.strip() not in {"_", "=", "\\^", "^"}:
                self.add(cell)
        if not self.table_block:
            self.line_break()

    def _request(self, rest: str) -> None:
        name, args = re.match(r"[ \t]*([^\s\\]*)(.*)", rest, re.S).groups()
        args = args.strip()
        if not name:
            return
        if name in {"if", "ie", "el"}:
            self._conditional(name, args)
            return
        if name == "do":
            self._request(args)
            return
        if name in {"de", "de1", "am", "am1", "dei", "ami", "ig"}:
            words = args.split()
            end = words[0 if name == "ig" else 1] if len(words) > (0 if name == "ig" else 1) else "."
            self.skip_until = end  # the definition ends at a line `.END` (`..` by default)
            return
        if name in {"ds", "ds1"}:
            key, _, value = args.partition(" ")
            value = value.lstrip()
            self.strings[key] = value[1:] if value.startswith('"') else value
            return
        if name == "TS":
            self.paragraph()
            self.table, self.table_tab, self.table_block = "format", "\t", False
            return
        if name == "T&":
            self.table = "format"
            return
        if name == "TE":
            self.paragraph()
            self.table, self.table_block = None, False
            return
        handler = _MAN_MACROS.get(name)
        if handler is not None:
            handler(self, args)
        elif name in _MDOC_MACROS:
            self._mdoc(name, args)
        # anything else (layout requests, index entries, unknown macros) is dropped

    def _conditional(self, name: str, args: str) -> None:
        if name == "el":
            condition, body = not self.last_condition, args
        else:
            condition, body = _condition(args)
            if name == "ie":
                self.last_condition = condition
        body = body.lstrip()
        if body.startswith("\\{"):
            self.conditions.append(condition)
            body = body[2:].lstrip()
            if body and all(self.conditions):
                self._line(body)
            return
        if condition and body:
            self._line(body)

    # macro helpers ---------------------------------------------------------------------------------------
    def _mdoc(self, name: str, args: str) -> None:
        if name in {"Dd", "Dt", "Os", "Sm", "Bk", "Ek", "Rs", "Re", "Xo", "Xc"}:
            return
        if name in {"Sh", "Ss"}:
            self.paragraph()
            self.add(self._mdoc_line(args), raw=True)
            self.paragraph()
        elif name in {"Pp", "Lp", "Bl", "El"}:
            self.paragraph()
        elif name == "Bd":
            self.paragraph()
            if "-literal" in args or "-unfilled" in args:
                self.fill = False
        elif name == "Ed":
            self.paragraph()
            self.fill = True
        elif name == "It":
            self.paragraph()
            if args:
                self.add(self._mdoc_line(args), raw=True)
                self.line_break()
        elif name == "Dl":
            self.paragraph()
            self.add(self._mdoc_line(args), raw=True)
            self.paragraph()
        elif name == "Nd":
            self.add("- " + self._mdoc_line(args), raw=True)
        else:
            self.add(self._mdoc_line(name + " " + args), raw=True)

    def _mdoc_line(self, args: str) -> str:
        """Render an mdoc macro line: macro names dropped, flags dashed, enclosures and punctuation placed."""
        tokens = [self.inline(word) for word in _arguments(args, escapes=True)]
        out: list[str] = []
        closers: list[str] = []
        glue = False
        prefix = ""
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if token in _MDOC_MACROS:
                if token in _MDOC_ENCLOSURES:
                    opener, closer = _MDOC_ENCLOSURES[token]
                    out.append(opener)
                    glue = True
                    closers.append(closer)
                elif token in {"Oc", "Dc", "Qc", "Sc", "Pc", "Ac", "Bc", "Brc", "Ec"}:
                    if closers:
                        out[-1:] = [(out[-1] if out else "") + closers.pop()]
                elif token == "Fl":
                    prefix = "-"
                    if i >= len(tokens) or tokens[i] in _MDOC_MACROS or _is_punctuation(tokens[i]):
                        out.append("-")
                        prefix = ""
                elif token == "Ns":
                    glue = True
                elif token == "Pf":
                    if i < len(tokens):
                        out.append(tokens[i])
                        i += 1
                        glue = True
                elif token == "Xr" and i + 1 < len(tokens) and not _is_punctuation(tokens[i + 1]):
                    out.append(f"{tokens[i]}({tokens[i + 1]})")
                    i += 2
                elif token == "Nm":
                    if i >= len(tokens) or tokens[i] in _MDOC_MACROS or _is_punctuation(tokens[i]):
                        out.append(self.mdoc_name)
                    elif not self.mdoc_name:
                        self.mdoc_name = tokens[i]
                elif token in _MDOC_WORDS:
                    out.append(_MDOC_WORDS[token])
                continue
            word = prefix + token
            prefix = ""
            if out and (glue or _is_punctuation(token)):
                out[-1] += word
            else:
                out.append(word)
            glue = token in {"(", "["}
        while closers:
            if out:
                out[-1] += closers.pop()
            else:
                out.append(closers.pop())
        return " ".join(w for w in out if w)

    def _font_args(self, args: str, alternating: bool) -> None:
        words = _arguments(args)
        if not words:
            return
        self.add("".join(words) if alternating else " ".join(words))

    def _link_end(self, args: str) -> None:
        target = self.links.pop() if self.links else ""
        if target:
            self.add(f"<{target}>")
        if args:
            self.glue = True
            self.add("".join(_arguments(args)))


def _condition(args: str) -> tuple[bool, str]:
    """Evaluate a `.if` condition as nroff would (output is a terminal, groff running); returns (value, body)."""
    negate = args.startswith("!")
    if negate:
        args = args[1:]
    value = True
    match = re.match(r"([ntoev])(?=\s|\\\{|$)", args)
    if match:
        value = match.group(1) in {"n", "o"}
        body = args[1:]
    elif re.match(r"[drmcFS]\s", args):
        parts = args.split(None, 2)
        value = False
        body = parts[2] if len(parts) > 2 else ""
    elif args[:1] in {"'", '"'} or (args[:1] and not args[:1].isalnum() and args[:1] not in "\\(-+"):
        delimiter = args[0]
        parts = args[1:].split(delimiter, 2)
        value = len(parts) == 3 and parts[0] == parts[1]
        body = parts[2] if len(parts) == 3 else ""
    else:
        expression, _, body = args.partition(" ")
        value = not expression.startswith(("0", "-"))
    return (not value if negate else value), body


def _arguments(args: str, escapes: bool = False) -> list[str]:
    """Macro arguments; a quoted argument keeps its spaces ("" inside quotes is a quote)."""
    words = re.findall(r'"((?:[^"]|"")*)"?|((?:\\.|[^\s\\])+|\\$)', args)
    return [(quoted.replace('""', '"') if quoted or not bare else bare) for quoted, bare in words]


def _is_punctuation(token: str) -> bool:
    return bool(token) and all(c in ".,:;)]?!" for c in token)


def _section(renderer: _Renderer, args: str) -> None:
    renderer.paragraph()
    words = _arguments(args)
    if words:
        renderer.add(" ".join(words))
        renderer.paragraph()
    else:
        renderer.pending_heading = True


def _tagged(renderer: _Renderer, args: str) -> None:
    renderer.paragraph()
    renderer.pending_tag = True


def _indented(renderer: _Renderer, args: str) -> None:
    renderer.paragraph()
    words = _arguments(args)
    if words and words[0]:
        tag = renderer.inline(words[0]).strip()
        renderer.add(tag, raw=True)
        if len(tag) > 3:
            renderer.line_break()


def _no_fill(renderer: _Renderer, args: str) -> None:
    renderer.paragraph()
    renderer.fill = False


def _fill(renderer: _Renderer, args: str) -> None:
    renderer.paragraph()
    renderer.fill = True


def _url(renderer: _Renderer, args: str) -> None:
    words = _arguments(args) + ["", "", ""]
    target, label, punctuation = (renderer.inline(w) for w in words[:3])
    renderer.add(f"{label} <{target}>" if label else target, raw=True)
    if punctuation:
        renderer.glue = True
        renderer.add(punctuation, raw=True)


def _synopsis_option(renderer: _Renderer, args: str) -> None:
    renderer.add("[" + " ".join(_arguments(args)) + "]")


_MAN_MACROS = {
    "SH": _section, "SS": _section, "TP": _tagged, "IP": _indented, "HP": lambda r, a: r.paragraph(),
    "PP": lambda r, a: r.paragraph(), "P": lambda r, a: r.paragraph(),
    "LP": lambda r, a: r.paragraph(), "Sp": lambda r, a: r.paragraph(), "sp": lambda r, a: r.paragraph(),
    "bp": lambda r, a: r.paragraph(), "RS": lambda r, a: r.paragraph(), "RE": lambda r, a: r.paragraph(),
    "INDENT": lambda r, a: r.paragraph(), "UNINDENT": lambda r, a: r.paragraph(), "YS": lambda r, a: r.paragraph(),
    "TQ": lambda r, a: (r.line_break(), setattr(r, "pending_tag", True)),
    "br": lambda r, a: r.line_break(), "in": lambda r, a: r.line_break(), "ti": lambda r, a: r.line_break(),
    "ce": lambda r, a: r.line_break(),
    "nf": _no_fill, "EX": _no_fill, "Vb": _no_fill, "fi": _fill, "EE": _fill, "Ve": _fill,
    "B": lambda r, a: r._font_args(a, False), "I": lambda r, a: r._font_args(a, False),
    "SM": lambda r, a: r._font_args(a, False), "SB": lambda r, a: r._font_args(a, False),
    "q": lambda r, a: r._font_args(a, False), "Quoted": lambda r, a: r._font_args(a, False),
    **{m: (lambda r, a: r._font_args(a, True)) for m in ("BR", "BI", "IB", "IR", "RB", "RI")},
    "SY": lambda r, a: (r.paragraph(), r._font_args(a, False)), "OP": _synopsis_option,
    "UR": lambda r, a: r.links.append(r.inline(" ".join(_arguments(a)))),
    "MT": lambda r, a: r.links.append(r.inline(" ".join(_arguments(a)))),
    "UE": lambda r, a: r._link_end(a), "ME": lambda r, a: r._link_end(a),
    "URL": _url, "MTO": _url,
}

_MDOC_ENCLOSURES = {
    "Op": ("[", "]"), "Oo": ("[", "]"), "Dq": ("“", "”"), "Do": ("“", "”"), "Qq": ('"', '"'), "Qo": ('"', '"'),
    "Sq": ("‘", "’"), "So": ("‘", "’"), "Ql": ("‘", "’"), "Pq": ("(", ")"), "Po": ("(", ")"),
    "Aq": ("<", ">"), "Ao": ("<", ">"), "Bq": ("[", "]"), "Bo": ("[", "]"), "Brq": ("{", "}"), "Bro": ("{", "}"),
}
_MDOC_WORDS = {"Ux": "UNIX", "Bx": "BSD", "Ox": "OpenBSD", "Fx": "FreeBSD", "Nx": "NetBSD", "Dx": "DragonFly",
               "At": "AT&T UNIX", "Bsx": "BSD/OS"}
_MDOC_MACROS = {
    "Ad", "An", "Ar", "Cd", "Cm", "Dv", "Er", "Ev", "Fa", "Fd", "Fl", "Fn", "Ft", "Ic", "In", "Li", "Nd", "Nm",
    "Ot", "Pa", "Va", "Vt", "Xr", "Em", "Sy", "No", "Ns", "Pf", "Sx", "Tn", "Lk", "Mt", "Ms", "St", "Fo", "Fc",
    "Ex", "Rv", "Oc", "Dc", "Qc", "Sc", "Pc", "Ac", "Bc", "Brc", "Ec", "Eo", "Dl", "Bd", "Ed", "Bl", "El", "It",
    "Sh", "Ss", "Pp", "Lp", "Dd", "Dt", "Os", "Sm", "Bk", "Ek", "Rs", "Re", "Xo", "Xc", "%A", "%T", "%B", "%J",
    "%D", "%N", "%O", "%P", "%V", *_MDOC_ENCLOSURES, *_MDOC_WORDS,
}


def _logical_lines(source: str) -> list[str]:
    """Input lines with comments removed and escaped newlines (a trailing backslash) joined."""
    lines: list[str] = []
    pending = ""
    for raw in source.replace("\r\n", "\n").split("\n"):
        line = pending + raw
        pending = ""
        cut = _comment_start(line)
        if cut is not None:
            if line[:cut].strip() in {".", "'", ""}:
                continue  # a comment line vanishes entirely
            line = line[:cut].rstrip()
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending = line[:-1]
            continue
        lines.append(line)
    if pending:
        lines.append(pending)
    return lines


def _comment_start(line: str) -> int | None:
    for match in re.finditer(r"\\(.)", line):
        if match.group(1) in {'"', "#"}:
            return match.start()
    return None


def roff_to_text(source: str) -> str:
    """Render man(7)/mdoc(7) roff source to plain text paragraphs (see the module docstring)."""
    renderer = _Renderer()
    for line in _logical_lines(source):
        renderer.feed(line)
    text = renderer.text()
    return re.sub(r"\n{3,}", "\n\n", text).strip()
