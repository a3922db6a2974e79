//! BatchGetUsers: validates the batch, runs the chosen strategy, and shapes the answer the same
//! way whichever strategy ran (request order, duplicates once, missing ids collected).

use std::collections::{HashMap, HashSet};

use tonic_types::FieldViolation;

use crate::error::Error;
use crate::logic::RequestContext;
use crate::logic::strategy;
use crate::pb::{self, Strategy};
use crate::svc::ServiceContext;

/// At most this many `ids[i]` violations are reported; more would only bloat the error.
const REPORTED_VIOLATIONS: usize = 10;

pub struct BatchGetUsersLogic<'a> {
    ctx: RequestContext,
    svc: &'a ServiceContext,
}

impl<'a> BatchGetUsersLogic<'a> {
    pub fn new(ctx: RequestContext, svc: &'a ServiceContext) -> Self {
        Self { ctx, svc }
    }

    /// # Errors
    /// INVALID_ARGUMENT for a bad batch, NOT_FOUND for missing ids unless `allow_missing`,
    /// DEADLINE_EXCEEDED, and database errors (the first one cancels the rest of the batch).
    pub async fn batch_get_users(
        &self,
        req: pb::BatchGetUsersRequest,
    ) -> Result<pb::BatchGetUsersResponse, Error> {
        let strategy = self.resolve_strategy(req.strategy)?;
        let ids = self.validate(&req.ids)?;
        let found = self.ctx.run(self.fetch(strategy, &ids)).await?;

        let mut by_id: HashMap<i64, pb::User> = found
            .into_iter()
            .map(|user| (user.id, pb::User::from(user)))
            .collect();
        let mut users = Vec::with_capacity(by_id.len());
        let mut missing_ids = Vec::new();
        for id in ids {
            match by_id.remove(&id) {
                Some(user) => users.push(user),
                None => missing_ids.push(id),
            }
        }
        if !missing_ids.is_empty() && !req.allow_missing {
            return Err(Error::NotFound(missing_ids));
        }
        Ok(pb::BatchGetUsersResponse {
            users,
            missing_ids,
            strategy: strategy.into(),
        })
    }

    /// The strategy to run: the request's, or the configured default for UNSPECIFIED.
    fn resolve_strategy(&self, requested: i32) -> Result<Strategy, Error> {
        match Strategy::try_from(requested) {
            Ok(Strategy::Unspecified) => Ok(self.svc.config.default_strategy),
            Ok(strategy) => Ok(strategy),
            Err(_) => Err(Error::invalid(
                "strategy",
                format!(
                    "unknown strategy {requested}: use 1 (STRATEGY_ERRGROUP), 2 (STRATEGY_MAPREDUCE), \
                     3 (STRATEGY_BATCH_QUERY) or 0 for the server default"
                ),
            )),
        }
    }

    /// The distinct ids in request order (first occurrence), or every rule the batch breaks.
    fn validate(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        let max = self.svc.config.max_batch;
        if ids.is_empty() {
            return Err(Error::invalid("ids", "must contain at least 1 id"));
        }
        if ids.len() > max {
            return Err(Error::invalid(
                "ids",
                format!("must contain at most {max} ids, got {}", ids.len()),
            ));
        }
        let bad: Vec<(usize, i64)> = ids
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, id)| id <= 0)
            .collect();
        if !bad.is_empty() {
            let mut violations: Vec<FieldViolation> = bad
                .iter()
                .take(REPORTED_VIOLATIONS)
                .map(|(i, id)| {
                    FieldViolation::new(format!("ids[{i}]"), format!("must be > 0, got {id}"))
                })
                .collect();
            if bad.len() > REPORTED_VIOLATIONS {
                violations.push(FieldViolation::new(
                    "ids",
                    format!("{} more ids are <= 0", bad.len() - REPORTED_VIOLATIONS),
                ));
            }
            return Err(Error::InvalidArgument(violations));
        }
        let mut seen = HashSet::with_capacity(ids.len());
        Ok(ids.iter().copied().filter(|id| seen.insert(*id)).collect())
    }

    async fn fetch(
        &self,
        strategy: Strategy,
        ids: &[i64],
    ) -> Result<Vec<crate::model::User>, Error> {
        match strategy {
            Strategy::Errgroup => strategy::errgroup::fetch(&self.ctx, self.svc, ids).await,
            Strategy::Mapreduce => strategy::mapreduce::fetch(&self.ctx, self.svc, ids).await,
            // Unspecified was resolved to the configured default, which is never Unspecified.
            Strategy::BatchQuery | Strategy::Unspecified => {
                strategy::batch_query::fetch(self.svc, ids).await
            }
        }
    }
}
