// oaproxy's dashboard: the one script of its pages (the CSP allows no other).
// It asks before a form marked data-confirm removes something, and reloads
// the Overview every 15 seconds while the tab is visible. Pages work without it.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
if (location.pathname === "/admin/ui/" || location.pathname === "/admin/ui") {
  setInterval(function () {
    if (document.visibilityState === "visible") {
      location.reload();
    }
  }, 15000);
}
