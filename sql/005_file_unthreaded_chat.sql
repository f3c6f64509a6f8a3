-- Chat rows stored before threads existed belong to no thread (their conversation_id, if
-- any, was a number the client chose), and the dashboard shows chat only inside threads.
-- Every row between a human and an agent or the Butler that names no thread of those two is
-- filed into the pair's default thread, made here when missing, as a frame naming no thread
-- is filed today.
CREATE TEMP TABLE unthreaded AS
SELECT c.id, c.timestamp AS ts, c.conversation_id,
       CASE WHEN s.role IN ('ADMIN', 'MEMBER') THEN c.sender_id ELSE c.receiver_id END AS human,
       CASE WHEN s.role IN ('ADMIN', 'MEMBER') THEN c.receiver_id ELSE c.sender_id END AS machine,
       CASE WHEN 'BUTLER' IN (s.role, r.role) THEN 'butler_direct' ELSE 'agent_direct' END AS kind
FROM chat_messages c
JOIN users s ON s.id = c.sender_id
JOIN users r ON r.id = c.receiver_id
WHERE (s.role IN ('ADMIN', 'MEMBER') AND r.role IN ('AGENT', 'BUTLER'))
   OR (s.role IN ('AGENT', 'BUTLER') AND r.role IN ('ADMIN', 'MEMBER'));

DELETE FROM unthreaded WHERE EXISTS (
    SELECT 1 FROM conversation_threads t
    WHERE t.id = unthreaded.conversation_id
      AND t.owner_user_id = unthreaded.human AND t.peer_user_id = unthreaded.machine);

INSERT INTO conversation_threads
    (owner_user_id, peer_user_id, channel_kind, title, is_default, created_at, updated_at)
SELECT human, machine, MAX(kind), 'New conversation', 1, MIN(ts), MIN(ts)
FROM unthreaded u
WHERE NOT EXISTS (
    SELECT 1 FROM conversation_threads t
    WHERE t.owner_user_id = u.human AND t.peer_user_id = u.machine AND t.is_default = 1)
GROUP BY human, machine;

UPDATE chat_messages SET conversation_id = (
    SELECT t.id FROM unthreaded u
    JOIN conversation_threads t
      ON t.owner_user_id = u.human AND t.peer_user_id = u.machine AND t.is_default = 1
    WHERE u.id = chat_messages.id)
WHERE id IN (SELECT id FROM unthreaded);

-- last_message_at follows the thread's newest row.
UPDATE conversation_threads SET
    last_message_at = (SELECT MAX(timestamp) FROM chat_messages WHERE conversation_id = conversation_threads.id),
    updated_at = MAX(updated_at, (SELECT MAX(timestamp) FROM chat_messages WHERE conversation_id = conversation_threads.id))
WHERE is_default = 1 AND EXISTS (
    SELECT 1 FROM unthreaded u WHERE u.human = owner_user_id AND u.machine = peer_user_id);

DROP TABLE unthreaded;
