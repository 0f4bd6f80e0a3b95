//! Provisioning: playbooks as data, and (elsewhere) the planner and the apply layer.

pub mod playbook;
