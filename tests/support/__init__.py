"""Test infrastructure for fidelity: probes, real-tool image builders, references, comparison.

``tests/conftest.py`` puts ``tests/`` on ``sys.path``, so import the modules as
``support.compare`` etc. (this package imports nothing on its own; the modules import each
other relatively, so either name works):

* :mod:`tests.support.probes` — :func:`populate_probes`, the probe paths of fidelity.md.
* :mod:`tests.support.images` — ext images (``mke2fs -d`` + fix-up), partitioned disks
  (layouts a-d), VMDK (``qemu-img``) and OVA (GNU tar) builders.
* :mod:`tests.support.reference` — :func:`make_reference`, root's ``mount -o ro`` + GNU tar.
* :mod:`tests.support.compare` — :func:`compare_tars` / :func:`assert_same_tree`.
* :mod:`tests.support.guests` — a debootstrapped Debian guest as an OVA (cached).

Most builders need root (loop devices, ``mknod``, ``chown``); guard tests with the
``require_root`` fixture.
"""
