# SPDX-License-Identifier: GPL-2.0-or-later
"""Runs profile.py the two ways geni-lib binds parameters offline and
checks the request RSpec it prints:

- standalone (no GENILIB_PORTAL_MODE), parameters as `--name value` on the
  command line (argparse, with the legal values as choices), RSpec on
  standard output: every combination of the listed values;
- portal mode (GENILIB_PORTAL_MODE=1), parameters from a JSON bindings file
  (GENILIB_PORTAL_PARAMS_PATH), RSpec written to GENILIB_PORTAL_REQUEST_PATH,
  errors as JSON on stderr with exit status 100 + their count: what the
  portal does, for the defaults, a few values and the rejected ones.

Usage: VENV_PYTHON check_profile.py PROFILE (with geni-lib importable)."""

import concurrent.futures
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

GENI = "{http://www.geni.net/resources/rspec/3}"
EMULAB = "{http://www.protogeni.net/resources/rspec/ext/emulab/1}"
TOUR = "{http://www.protogeni.net/resources/rspec/ext/apt-tour/1}"
PARAMS = "{http://www.protogeni.net/resources/rspec/ext/profile-parameters/1}"

NODE_TYPES = ["c6420", "c220g5", "sm110p", "c240g5", "c6320", "r650"]
IMAGES = [
    "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU24-64-STD",
    "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD",
]
EVALS = ["none", "record-perf", "bug-repro", "both"]
DISKS = ["0GB", "200GB"]
COUNTS = [1, 2, 8]
DEFAULTS = {
    "nodeType": "c6420",
    "osImage": IMAGES[0],
    "diskSize": "0GB",
    "evaluation": "both",
    "nodeCount": 1,
}
SETUP = "sudo bash /local/repository/cloudlab/setup.sh"
# The instructions must say where the logs, markers and status are, and
# give the commands to run by hand.
INSTRUCTIONS_MENTION = [
    "/mydata/krr-setup/setup.log",
    "/mydata/krr-setup/status",
    "phase-<name>.done",
    "FAILED <phase>",
    "/var/tmp/startup-",
    "cargo xtask eval record-perf",
    "cargo xtask eval bug-repro",
]


def expected_command(evaluation, index, count):
    cmd = "%s --eval %s" % (SETUP, evaluation)
    if count > 1:
        cmd += " --shard %d/%d" % (index, count)
    return cmd


def check_rspec(xml_text, p):
    """Problems with the RSpec for parameters p (a full dict), as strings."""
    problems = []
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        return ["not XML: %s" % e]
    if root.tag != GENI + "rspec" or root.get("type") != "request":
        problems.append("root is %s type=%s, not a request rspec" % (root.tag, root.get("type")))
    nodes = root.findall(GENI + "node")
    if len(nodes) != p["nodeCount"]:
        problems.append("%d nodes, expected %d" % (len(nodes), p["nodeCount"]))
    for i, node in enumerate(nodes, start=1):
        name = node.get("client_id")
        where = "node %s" % name
        if name != "node%d" % i:
            problems.append("node %d is named %s, expected node%d" % (i, name, i))
        if node.get("exclusive") != "true":
            problems.append("%s: not exclusive (bare metal)" % where)
        hw = node.findall(GENI + "hardware_type")
        if [h.get("name") for h in hw] != [p["nodeType"]]:
            problems.append("%s: hardware types %s, expected [%s]"
                            % (where, [h.get("name") for h in hw], p["nodeType"]))
        images = node.findall(GENI + "sliver_type/" + GENI + "disk_image")
        if [d.get("name") for d in images] != [p["osImage"]]:
            problems.append("%s: disk images %s, expected [%s]"
                            % (where, [d.get("name") for d in images], p["osImage"]))
        execs = node.findall(GENI + "services/" + GENI + "execute")
        want = expected_command(p["evaluation"], i, p["nodeCount"])
        got = [(e.get("shell"), e.get("command")) for e in execs]
        if got != [("bash", want)]:
            problems.append("%s: execute services %s, expected [('bash', %r)]" % (where, got, want))
        bss = node.findall(EMULAB + "blockstore")
        if len(bss) != 1:
            problems.append("%s: %d blockstores, expected 1" % (where, len(bss)))
        for bs in bss:
            if bs.get("mountpoint") != "/mydata" or bs.get("class") != "local":
                problems.append("%s: blockstore mountpoint=%s class=%s, expected /mydata, local"
                                % (where, bs.get("mountpoint"), bs.get("class")))
            if bs.get("name") != "node%d-bs" % i:
                problems.append("%s: blockstore named %s" % (where, bs.get("name")))
            # geni-lib writes no size for 0GB (all free space).
            want_size = None if p["diskSize"] == "0GB" else p["diskSize"]
            if bs.get("size") != want_size:
                problems.append("%s: blockstore size %s, expected %s"
                                % (where, bs.get("size"), want_size))
    instructions = root.findtext(TOUR + "rspec_tour/" + TOUR + "instructions") or ""
    for text in INSTRUCTIONS_MENTION:
        if text not in instructions:
            problems.append("instructions do not mention %r" % text)
    items = {d.get("name"): d.text for d in root.iter(PARAMS + "data_item")}
    for key, value in p.items():
        if items.get("emulab.net.parameter." + key) != str(value):
            problems.append("parameter data: %s=%r, expected %r"
                            % (key, items.get("emulab.net.parameter." + key), str(value)))
    return problems


def run_standalone(profile, p):
    args = [sys.executable, profile]
    for key, value in p.items():
        args += ["--" + key, str(value)]
    env = dict(os.environ)
    env.pop("GENILIB_PORTAL_MODE", None)
    out = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, universal_newlines=True)
    if out.returncode != 0:
        return ["exit %d: %s" % (out.returncode, out.stderr.strip()[-2000:])]
    return check_rspec(out.stdout, p)


def run_portal(profile, bindings, tmp):
    """(exit status, RSpec text or None, stderr) of a portal-mode run."""
    fd, params_path = tempfile.mkstemp(dir=tmp, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(bindings, f)
    request_path = params_path[:-5] + ".xml"
    env = dict(os.environ, GENILIB_PORTAL_MODE="1",
               GENILIB_PORTAL_PARAMS_PATH=params_path,
               GENILIB_PORTAL_REQUEST_PATH=request_path)
    out = subprocess.run([sys.executable, profile], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, universal_newlines=True)
    rspec = None
    if os.path.exists(request_path):
        with open(request_path) as f:
            rspec = f.read()
    return out.returncode, rspec, out.stderr


def main():
    profile = sys.argv[1]
    failures = []

    combos = [dict(zip(("nodeType", "osImage", "diskSize", "evaluation", "nodeCount"), c))
              for c in itertools.product(NODE_TYPES, IMAGES, DISKS, EVALS, COUNTS)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: (p, run_standalone(profile, p)), combos))
    bad = [(p, probs) for p, probs in results if probs]
    for p, probs in bad[:10]:
        failures.append("standalone %s:\n    %s" % (json.dumps(p), "\n    ".join(probs)))
    if len(bad) > 10:
        failures.append("... and %d more failing combinations" % (len(bad) - 10))
    print("standalone (--name value): %d combinations (%d node types x %d images x "
          "%d disk sizes x %d evaluations x %d node counts), %d failed"
          % (len(combos), len(NODE_TYPES), len(IMAGES), len(DISKS), len(EVALS),
             len(COUNTS), len(bad)))

    # An unknown node type is refused by argparse (exit 2).
    out = subprocess.run([sys.executable, profile, "--nodeType", "m510"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    if out.returncode != 2 or "invalid choice" not in out.stderr:
        failures.append("standalone --nodeType m510: exit %d, expected 2 with 'invalid choice': %s"
                        % (out.returncode, out.stderr.strip()))

    tmp = tempfile.mkdtemp(prefix="krr-profile-")
    portal_ok = [
        {},
        {"nodeType": "c220g5", "osImage": IMAGES[1], "diskSize": "500GB",
         "evaluation": "bug-repro", "nodeCount": 3},
        {"nodeType": "r650", "evaluation": "none", "nodeCount": "2"},
    ]
    for bindings in portal_ok:
        p = dict(DEFAULTS)
        p.update(bindings)
        p["nodeCount"] = int(p["nodeCount"])
        rc, rspec, err = run_portal(profile, bindings, tmp)
        if rc != 0 or rspec is None:
            failures.append("portal mode %s: exit %d, %s: %s"
                            % (json.dumps(bindings), rc,
                               "no RSpec" if rspec is None else "RSpec written", err.strip()))
            continue
        probs = check_rspec(rspec, p)
        if probs:
            failures.append("portal mode %s:\n    %s" % (json.dumps(bindings), "\n    ".join(probs)))
    portal_bad = [
        ({"nodeCount": 0}, "nodeCount"),
        ({"nodeCount": 9}, "nodeCount"),
        ({"diskSize": "lots"}, "diskSize"),
        ({"diskSize": "200"}, "diskSize"),
        ({"nodeType": "m510"}, "nodeType"),
        ({"evaluation": "everything"}, "evaluation"),
        ({"osImage": "urn:publicid:IDN+emulab.net+image+emulab-ops//CENTOS8-64-STD"}, "osImage"),
    ]
    for bindings, param in portal_bad:
        rc, rspec, err = run_portal(profile, bindings, tmp)
        try:
            errors = json.loads(err)
        except ValueError:
            errors = None
        named = isinstance(errors, list) and any(param in e.get("params", []) for e in errors)
        if rc <= 100 or rspec is not None or not named:
            failures.append("portal mode %s: exit %d, RSpec %s, stderr %r; expected exit > 100, "
                            "no RSpec, a JSON error naming %s"
                            % (json.dumps(bindings), rc, "written" if rspec else "not written",
                               err.strip(), param))
    shutil.rmtree(tmp, ignore_errors=True)
    print("portal mode (JSON bindings): %d accepted and %d rejected bindings checked"
          % (len(portal_ok), len(portal_bad)))

    for f in failures:
        print("FAIL: " + f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
