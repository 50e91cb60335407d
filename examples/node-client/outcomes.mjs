// The consumer's rule (CONTRACT.md section 4, README "Adding a consumer"), with no I/O, so that
// it can be read, copied and tested on its own.
//
// The state is one entry per teacher: the last outcome applied for that TRN. Memory stays one
// outcome per teacher, however long the stream:
//   - an outcome whose outcome_id is the one last applied for its TRN is a duplicate (a
//     redelivery, a relay re-send, or a resync of what you already have);
//   - an outcome whose version is not above the last applied for its TRN is stale (an older
//     outcome delivered late, for example live traffic overtaken by a resync); this also drops
//     a late duplicate of an older outcome, whose outcome_id is no longer kept;
//   - anything else is applied and replaces the teacher's entry.

/** What `decide` can return. */
export const APPLIED = 'applied';
export const DUPLICATE = 'duplicate';
export const STALE = 'stale';

/**
 * Checks that a parsed body is an outcome this consumer understands (schema version 1, a TRN,
 * a positive integer version, an outcome_id). Returns a reason to reject it, or null.
 */
export function invalid(outcome) {
  if (outcome === null || typeof outcome !== 'object' || Array.isArray(outcome)) {
    return 'not a JSON object';
  }
  if (outcome.schema_version !== 1) {
    return `unsupported schema_version ${JSON.stringify(outcome.schema_version)}`;
  }
  if (typeof outcome.trn !== 'string' || !/^[0-9]{7}$/.test(outcome.trn)) {
    return 'no TRN of 7 digits';
  }
  if (!Number.isSafeInteger(outcome.version) || outcome.version < 1) {
    return 'no positive integer version';
  }
  if (typeof outcome.outcome_id !== 'string' || outcome.outcome_id.length === 0) {
    return 'no outcome_id';
  }
  return null;
}

/** Decides what to do with a valid outcome, given the last applied for its TRN (or undefined). */
export function decide(last, outcome) {
  if (last !== undefined && last.outcome_id === outcome.outcome_id) {
    return DUPLICATE;
  }
  if (last !== undefined && outcome.version <= last.version) {
    return STALE;
  }
  return APPLIED;
}

/** Applies a valid outcome to `teachers` (an object keyed by TRN); returns the decision. */
export function apply(teachers, outcome) {
  const decision = decide(teachers[outcome.trn], outcome);
  if (decision === APPLIED) {
    teachers[outcome.trn] = outcome;
  }
  return decision;
}
