//! Why a request got its decision: every policy that applied, every rule, every clause.
//! Used by `nodeward check`; the enforcer's path never builds one.

use serde::Serialize;

use super::compile::WorkloadPolicies;
use super::eval::{Outcome, Request, Trace};
use crate::policy::Action;

/// One clause's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClauseOutcome {
    pub field: String,
    pub outcome: Outcome,
}

/// One rule's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleExplanation {
    pub index: usize,
    pub matched: bool,
    /// Why the rule cannot match this request at all (an ALLOW rule with HTTP-only fields on a
    /// TCP connection, ...).
    pub dropped: Option<&'static str>,
    pub clauses: Vec<ClauseOutcome>,
}

/// One policy's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyExplanation {
    pub policy: String,
    pub action: Action,
    pub dry_run: bool,
    pub file: String,
    pub matched_rule: Option<usize>,
    pub rules: Vec<RuleExplanation>,
}

/// Every policy in scope of the workload, evaluated in full.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub policies: Vec<PolicyExplanation>,
    /// Policies of the namespace that use targetRef(s): they apply to gateways and waypoints.
    pub not_applied: Vec<String>,
}

struct Collect(Vec<ClauseOutcome>);

impl Trace for Collect {
    const FULL: bool = true;
    fn clause(&mut self, label: &str, outcome: Outcome) {
        self.0.push(ClauseOutcome {
            field: label.to_owned(),
            outcome,
        });
    }
}

/// Evaluates every rule of every applicable policy, recording each clause.
#[must_use]
pub fn explain(policies: &WorkloadPolicies, req: &Request<'_>) -> Explanation {
    let explained = policies
        .all()
        .map(|p| {
            let rules: Vec<RuleExplanation> = p
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| {
                    let mut collect = Collect(Vec::new());
                    let matched = rule.matches(p.action, req, &mut collect);
                    RuleExplanation {
                        index,
                        matched,
                        dropped: rule.dropped(p.action, req),
                        clauses: collect.0,
                    }
                })
                .collect();
            PolicyExplanation {
                policy: p.id.clone(),
                action: p.action,
                dry_run: p.dry_run,
                file: p.origin.to_string(),
                matched_rule: rules.iter().find(|r| r.matched).map(|r| r.index),
                rules,
            }
        })
        .collect();
    Explanation {
        policies: explained,
        not_applied: policies.targeted.iter().map(|p| p.id.clone()).collect(),
    }
}
