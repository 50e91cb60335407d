// The consumer's rule on its own (node --test; tests/node_client.rs runs it).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { APPLIED, DUPLICATE, STALE, apply, invalid } from './outcomes.mjs';

const outcome = (version, id, trn = '1234567') => ({
  schema_version: 1,
  outcome_id: id,
  trn,
  version,
  status: 'provisional',
});

test('a first outcome is applied, and a higher version replaces it', () => {
  const teachers = {};
  assert.equal(apply(teachers, outcome(1, 'a')), APPLIED);
  assert.equal(apply(teachers, outcome(3, 'c')), APPLIED);
  assert.equal(teachers['1234567'].outcome_id, 'c');
});

test('the same outcome_id again is a duplicate and changes nothing', () => {
  const teachers = {};
  apply(teachers, outcome(2, 'b'));
  assert.equal(apply(teachers, outcome(2, 'b')), DUPLICATE);
  assert.equal(teachers['1234567'].version, 2);
});

test('a version not above the last applied is stale, whatever its id', () => {
  const teachers = {};
  apply(teachers, outcome(5, 'e'));
  assert.equal(apply(teachers, outcome(4, 'd')), STALE);
  assert.equal(apply(teachers, outcome(5, 'other')), STALE);
  assert.equal(teachers['1234567'].outcome_id, 'e');
});

test('teachers are independent', () => {
  const teachers = {};
  apply(teachers, outcome(7, 'x', '1111111'));
  assert.equal(apply(teachers, outcome(1, 'y', '2222222')), APPLIED);
  assert.deepEqual(Object.keys(teachers).sort(), ['1111111', '2222222']);
});

test('an outcome it cannot read is named, not applied', () => {
  assert.equal(invalid(outcome(1, 'a')), null);
  assert.match(invalid({ ...outcome(1, 'a'), schema_version: 2 }), /schema_version/);
  assert.match(invalid({ ...outcome(1, 'a'), trn: '123' }), /TRN/);
  assert.match(invalid({ ...outcome(0, 'a') }), /version/);
  assert.match(invalid({ ...outcome(1.5, 'a') }), /version/);
  assert.match(invalid({ ...outcome(1, '') }), /outcome_id/);
  assert.match(invalid([]), /object/);
  assert.match(invalid(null), /object/);
});
