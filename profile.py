# SPDX-License-Identifier: GPL-2.0-or-later
"""krr (kernel record-replay) on bare metal: Intel nodes with VT-x and a PMU,
set up in one go (host tuning, packages, Rust, build, guest images) and,
if chosen, running `cargo xtask eval record-perf` and/or `bug-repro`.
The profile's instructions say where the logs and results are.
"""

# Python 2 and 3: the portal's geni-lib may run either.
import re

import geni.portal as portal
import geni.rspec.igext as IG
import geni.rspec.pg as pg

SETUP = "/local/repository/cloudlab/setup.sh"
STATE = "/mydata/krr-setup"
MAX_NODES = 8

# Intel, VT-x + PMU, at least 16 physical cores (not AMD, ARM, xl170, m510).
NODE_TYPES = [
    ("c6420", "c6420: 2x Xeon Gold 6142, 32 cores, 384 GB (Clemson) - KRR's record-perf host"),
    ("c220g5", "c220g5: 2x Xeon Silver 4114, 20 cores, 192 GB (Wisconsin) - KRR's bug-repro host"),
    ("sm110p", "sm110p"),
    ("c240g5", "c240g5"),
    ("c6320", "c6320"),
    ("r650", "r650"),
]
IMAGES = [
    ("urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU24-64-STD", "Ubuntu 24.04"),
    ("urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD", "Ubuntu 22.04"),
]
EVALS = [
    ("both", "record-perf, then bug-repro"),
    ("record-perf", "record-perf only"),
    ("bug-repro", "bug-repro only"),
    ("none", "none: set up only, run the evaluations by hand"),
]

pc = portal.context

pc.defineParameter(
    "nodeType", "Node type", portal.ParameterType.NODETYPE, NODE_TYPES[0], NODE_TYPES,
    longDescription="Intel nodes with VT-x, a PMU and at least 16 physical cores. "
    "Pick the cluster that has this type when instantiating.")
pc.defineParameter(
    "osImage", "Disk image", portal.ParameterType.IMAGE, IMAGES[0], IMAGES)
pc.defineParameter(
    "diskSize", "Local disk for /mydata", portal.ParameterType.STRING, "0GB",
    longDescription="Size of the local blockstore mounted at /mydata (builds, image "
    "cache, results), e.g. 200GB. 0GB takes all free space on the node's disks.")
pc.defineParameter(
    "evaluation", "Evaluation to start after setup", portal.ParameterType.STRING,
    EVALS[0], EVALS)
pc.defineParameter(
    "nodeCount", "Number of nodes", portal.ParameterType.INTEGER, 1,
    longDescription="With N > 1 nodes, node i runs shard i/N of each chosen "
    "evaluation (cargo xtask eval ... --shard i/N); merge the results with "
    "cargo xtask results merge (see the instructions).")

params = pc.bindParameters()

if not re.match(r"^[0-9]+GB$", params.diskSize):
    pc.reportError(portal.ParameterError(
        "Disk size must be a whole number of GB such as 200GB (0GB: all free space)",
        ["diskSize"]))
if params.nodeCount < 1 or params.nodeCount > MAX_NODES:
    pc.reportError(portal.ParameterError(
        "Number of nodes must be between 1 and %d" % MAX_NODES, ["nodeCount"]))
pc.verifyParameters()


def setup_command(index, count):
    """The startup command of node `index` (1-based) of `count`."""
    cmd = "sudo bash %s --eval %s" % (SETUP, params.evaluation)
    if count > 1:
        cmd += " --shard %d/%d" % (index, count)
    return cmd


request = pc.makeRequestRSpec()
for i in range(1, params.nodeCount + 1):
    node = request.RawPC("node%d" % i)
    node.hardware_type = params.nodeType
    node.disk_image = params.osImage
    # Blockstore names are unique per experiment, hence the node's name.
    bs = node.Blockstore("node%d-bs" % i, "/mydata")
    bs.size = params.diskSize
    node.addService(pg.Execute(shell="bash", command=setup_command(i, params.nodeCount)))

EVAL_RUNS = {"both": ["record-perf", "bug-repro"], "none": []}.get(
    params.evaluation, [params.evaluation])
if params.nodeCount > 1:
    shown_cmd = "sudo bash %s --eval %s --shard i/%d" % (SETUP, params.evaluation, params.nodeCount)
else:
    shown_cmd = setup_command(1, 1)
if EVAL_RUNS:
    started = "Then it runs %s%s." % (
        ", then ".join("`cargo xtask eval %s`" % e for e in EVAL_RUNS),
        " with `--shard i/%d` on node i" % params.nodeCount if params.nodeCount > 1 else "")
else:
    started = "No evaluation is started: setup ends once the guest images are built."

INSTRUCTIONS = """\
Setup runs by itself on every node (startup command: `%(cmd)s`; it runs again
at every boot and skips what is done). It takes one to several hours: packages,
Rust, a release build, then the guest kernels and images. %(started)s

**Is it done?** On a node: `cat %(state)s/status` says `RUNNING <phase>`, `DONE`
or `FAILED <phase>` (under `DONE`, a line for each evaluation that finished with
failed cells or unreproduced bugs). Each finished phase leaves
`%(state)s/phase-<name>.done`.

**Logs:** `%(state)s/setup.log` (everything, with each command), and the
startup service's own output in `/var/tmp/startup-*.txt`.

**Results:** `/mydata/krr/results/record-perf/cloudlab*/` and
`/mydata/krr/results/bug-repro/cloudlab*/` (`report.md` in each); host and
toolchain versions in `/mydata/krr/results/cloudlab/`.

**On FAILED:** read the end of `%(state)s/setup.log` (the failed command and its
output are there), fix the cause, then run the startup command again by hand:
`%(cmd)s`. Finished phases are skipped.

**By hand** (after `DONE`; log in again first so the environment of
`/etc/profile.d/krr.sh` is set: `KRR_CACHE=/mydata/cache`, the Rust toolchain):

    cd /mydata/krr
    cargo xtask eval record-perf
    cargo xtask eval bug-repro

**Several nodes:** node i ran shard i/N. Copy every node's
`/mydata/krr/results` to one place and merge each evaluation's shards:
`cargo xtask results merge <each node's results>/record-perf/cloudlab-shard-* --out merged`.
""" % {
    "cmd": shown_cmd,
    "started": started,
    "state": STATE,
}

tour = IG.Tour()
tour.Description(
    IG.Tour.MARKDOWN,
    "krr (kernel record-replay) on %d %s node(s) with %s: host tuning (SMT and "
    "turbo off, perf events, KVM), build, guest images, then the chosen evaluation "
    "(%s)." % (params.nodeCount, params.nodeType,
               dict(IMAGES).get(params.osImage, params.osImage), params.evaluation))
tour.Instructions(IG.Tour.MARKDOWN, INSTRUCTIONS)
request.addTour(tour)

pc.printRequestRSpec(request)
