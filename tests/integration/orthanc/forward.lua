-- Orthanc Lua hooks that forward every stable study to kgdx by STOW-RS.
--
-- ${SERVER} is the name of the kgdx entry under "DicomWeb": {"Servers": {...}} in the
-- Orthanc configuration (tests/orthanc.py fills it in; an integrator writes the name).
-- Orthanc calls OnStableStudy once a study has received no new instance for "StableAge"
-- seconds, and again each time the study changes and settles (for instance when kgdx's
-- SR lands in it): kgdx must treat that re-forward as a duplicate.
--
-- The "kgdx-..." lines go to Orthanc's log ("Lua says: ..."); the tests read them.

function OnStableStudy(studyId, tags, metadata)
   local body = '{"Resources": ["' .. studyId .. '"], "Synchronous": true}'
   -- Synchronous: the call returns once kgdx has answered, so the outcome is known here.
   -- RestApiPost answers nil when the STOW-RS job failed (non-2xx answer, no 00081199,
   -- fewer items in 00081199 than instances sent, failed items, network error). Orthanc
   -- does not retry a failed forward by itself.
   local ok, answer = pcall(RestApiPost, '/dicom-web/servers/${SERVER}/stow', body)
   if ok and answer ~= nil then
      print('kgdx-forward ok study=' .. studyId)
   else
      print('kgdx-forward failed study=' .. studyId .. ' error=' .. tostring(answer))
   end
end

-- Every HTTP request Orthanc receives (kgdx pushing its SR by STOW-RS among them); the value
-- of the Authorization header is never printed, only whether one came and its scheme.
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
   local auth = headers['authorization']
   local scheme = 'none'
   if auth ~= nil then
      scheme = string.match(auth, '^(%S+)') or 'other'
   end
   print('kgdx-http ' .. method .. ' ' .. uri .. ' auth=' .. scheme)
   return true
end
