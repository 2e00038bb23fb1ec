"""Quality measurement: fidelity of a compressed cache against the exact one."""
