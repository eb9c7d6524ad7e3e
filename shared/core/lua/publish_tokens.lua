-- Per-token streaming: append the tokens a running slice just generated to the event
-- streams of its streaming requests, as `kind=tokens` entries (docs/design.md §5).
-- KEYS: per request i: req_i, events_i
-- ARGV: batch_id, then per request i (4 each): fence, pos, ids_csv, logprobs_json (the
-- ids' logprobs as the request hash stores them; '' when the request does not ask: no field)
-- Fenced like the commit: a request no longer held by this batch at this fence (swept,
-- requeued, cancelled) gets nothing, so only the slice that will commit publishes. The
-- entries are a preview: the slice's commit entry repeats its tokens (same pos), so a
-- reader that missed some loses nothing. Returns how many entries were written.
local batch_id = ARGV[1]
local written = 0
for i = 1, #KEYS / 2 do
  local a = 1 + (i - 1) * 4
  local cur = redis.call('HMGET', KEYS[2 * i - 1], 'batch', 'fence', 'status')
  if cur[1] == batch_id and cur[2] == ARGV[a + 1] and cur[3] == 'running' then
    if ARGV[a + 4] == '' then
      redis.call('XADD', KEYS[2 * i], '*', 'kind', 'tokens', 'pos', ARGV[a + 2],
        'ids', ARGV[a + 3])
    else
      redis.call('XADD', KEYS[2 * i], '*', 'kind', 'tokens', 'pos', ARGV[a + 2],
        'ids', ARGV[a + 3], 'logprobs', ARGV[a + 4])
    end
    written = written + 1
  end
end
return written
