-- Renew the leader lock only if we still hold it.  KEYS: leader  ARGV: holder, ttl_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
