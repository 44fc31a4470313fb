-- Forward every stable study to kgdx by STOW-RS (DICOMweb server "kgdx").
--
-- The "kgdx" entry of DicomWeb.Servers (its URL and the ingest API key) comes from the
-- ORTHANC__DICOM_WEB__SERVERS variable in docker/compose.yaml. Orthanc calls OnStableStudy
-- once a study has had no new instance for StableAge seconds, and again when it changes and
-- settles (for instance when kgdx's SR lands in it); kgdx treats the re-forward as a
-- duplicate. Orthanc never retries a failed forward: the line below is the trace to look
-- for in `docker compose logs orthanc`, and a failed study can be sent again by hand with
--   curl -u admin:... -X POST http://localhost:8042/dicom-web/servers/kgdx/stow \
--        -d '{"Resources": ["<Orthanc study id>"]}'
-- (see tests/integration/orthanc/NOTES.md for what Orthanc sends and expects back).

function OnStableStudy(studyId, tags, metadata)
   local body = '{"Resources": ["' .. studyId .. '"], "Synchronous": true}'
   local ok, answer = pcall(RestApiPost, '/dicom-web/servers/kgdx/stow', body)
   if ok and answer ~= nil then
      print('kgdx-forward ok study=' .. studyId)
   else
      print('kgdx-forward failed study=' .. studyId .. ' error=' .. tostring(answer))
   end
end
