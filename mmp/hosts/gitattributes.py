"""`export-ignore` decided the way `git archive` decides it, for hosts with no archive API.

git archive reads the `.gitattributes` files of the tree it archives and asks, for every entry
(a directory with a trailing "/"), whether `export-ignore` is set; a set directory is left out
whole. The rules (gitattributes(5), gitignore(5), git's attr.c and archive.c):

- a pattern without a "/" (a trailing one aside) matches the entry's name at any depth below the
  attributes file's folder; one with a "/" is anchored to that folder;
- `*` and `?` never match "/", `**` does where gitignore allows it (`**/x`, `x/**`, `a/**/b`);
- a trailing "/" matches directories only;
- within a file the last matching line wins; a deeper folder's file wins over a shallower one;
- `export-ignore` is set by the bare word only: `-export-ignore` unsets it, `!export-ignore`
  makes it unspecified, `export-ignore=value` is not "set".

Not modelled (said in docs/gitops.md): `[attr]` macros defined in the tree (git only honours them
in the top-level file) and `$GIT_DIR/info/attributes`, which a remote host's tree does not hold.
Tests compare this with real `git archive` output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ATTRIBUTES_FILE = ".gitattributes"


@lru_cache(maxsize=1024)
def _wildmatch(pattern: str) -> re.Pattern[str]:
    """gitignore's wildmatch with WM_PATHNAME, as a regular expression."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            double = j - i >= 2 and (i == 0 or pattern[i - 1] == "/") and (j == n or pattern[j] == "/")
            if double and j == n:
                out.append(".*")
            elif double:
                out.append("(?:.*/)?")
                j += 1  # the "/" after ** is part of "zero or more folders"
            else:
                out.append("[^/]*")
            i = j
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("(?!/)[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


@dataclass(frozen=True)
class Rule:
    pattern: str
    anchored: bool
    dir_only: bool
    value: bool | None  # True set, False unset, None unspecified

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        subject = rel if self.anchored else rel.rsplit("/", 1)[-1]
        return _wildmatch(self.pattern).fullmatch(subject) is not None


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] == '"':
        return bytes(token[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
    return token


def parse(text: str) -> list[Rule]:
    """The export-ignore rules of one .gitattributes file, in file order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("[attr]"):
            continue
        if line.startswith('"'):
            end = line.find('"', 1)
            while end > 0 and line[end - 1] == "\\":
                end = line.find('"', end + 1)
            token, rest = (line[:end + 1], line[end + 1:]) if end > 0 else (line, "")
        else:
            token, _, rest = line.partition(" ") if " " in line else line.partition("\t")
        pattern = _unquote(token)
        value: bool | None = "unmentioned"  # type: ignore[assignment]
        for attr in rest.split():
            if attr == "export-ignore":
                value = True
            elif attr == "-export-ignore":
                value = False
            elif attr == "!export-ignore" or attr.startswith("export-ignore="):
                value = None
        if value == "unmentioned" or pattern.startswith("!"):  # negative patterns are refused by git
            continue
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        anchored = "/" in pattern
        rules.append(Rule(pattern.lstrip("/"), anchored, dir_only, value))
    return rules


class ExportIgnore:
    """The export-ignore answer for paths of one tree, from the .gitattributes files read so far.

    `add(folder, text)` registers the attributes file of `folder` ("" for the root) before any path
    under it is asked about; `ignored(path, is_dir)` then answers as git archive would."""

    def __init__(self) -> None:
        self._files: dict[str, list[Rule]] = {}

    def add(self, folder: str, text: str) -> None:
        self._files[folder.strip("/")] = parse(text)

    def ignored(self, path: str, is_dir: bool = False) -> bool:
        path = path.strip("/")
        parts = path.split("/")
        folders = [""] + ["/".join(parts[:i]) for i in range(1, len(parts))]
        for folder in reversed(folders):  # the deepest attributes file that decides, wins
            rules = self._files.get(folder)
            if not rules:
                continue
            rel = path[len(folder) + 1:] if folder else path
            for rule in reversed(rules):
                if rule.matches(rel, is_dir):
                    return bool(rule.value)  # !export-ignore decides too: unspecified, not ignored
        return False
