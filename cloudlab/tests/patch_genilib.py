# SPDX-License-Identifier: GPL-2.0-or-later
"""Makes geni-lib 0.9.9.4 (PyPI) run on Python 3, in the virtual environment
whose interpreter runs this script: the Python-2 print statements and
raw_input of geni/portal.py and geni/support/ipython.py, and writeXML
(geni/rspec/pg.py), which writes bytes to a text stream. Touches nothing
outside that environment. Each fix must find its target: a changed geni-lib
fails here rather than being half patched."""

import importlib.util
import os
import re
import sys

PRINT = re.compile(r"^(\s*)print (.+?)\s*$")


def package_dir():
    spec = importlib.util.find_spec("geni")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("patch_genilib: geni-lib is not installed in %s" % sys.prefix)
    path = os.path.realpath(list(spec.submodule_search_locations)[0])
    if not path.startswith(os.path.realpath(sys.prefix) + os.sep):
        sys.exit("patch_genilib: refusing to patch %s: not inside this virtual environment (%s)"
                 % (path, sys.prefix))
    return path


def fix_prints(path):
    with open(path) as f:
        lines = f.read().split("\n")
    fixed = 0
    for n, line in enumerate(lines):
        m = PRINT.match(line)
        if m and not m.group(2).startswith("("):
            lines[n] = "%sprint(%s)" % (m.group(1), m.group(2))
            fixed += 1
    text = "\n".join(lines)
    text, inputs = re.subn(r"\braw_input\(", "input(", text)
    return text, fixed, inputs


def replace_once(text, old, new, what):
    if text.count(old) != 1:
        sys.exit("patch_genilib: %s: expected exactly one '%s'" % (what, old))
    return text.replace(old, new)


def main():
    geni = package_dir()
    for rel, want_prints in (("portal.py", 4), ("support/ipython.py", 1)):
        path = os.path.join(geni, rel)
        text, fixed, _ = fix_prints(path)
        if fixed != want_prints:
            sys.exit("patch_genilib: %s: expected %d print statements, found %d"
                     % (rel, want_prints, fixed))
        with open(path, "w") as f:
            f.write(text)
    pg = os.path.join(geni, "rspec", "pg.py")
    with open(pg) as f:
        text = f.read()
    text = replace_once(text, "buf = self.toXMLString(True)\n",
                        "buf = self.toXMLString(True, ucode=True)\n", "rspec/pg.py writeXML")
    with open(pg, "w") as f:
        f.write(text)
    print("patch_genilib: patched %s" % geni)


if __name__ == "__main__":
    main()
