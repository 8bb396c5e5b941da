// What to pay (templates/_pay_options.html). Without JavaScript each choice is a submit button of its
// own. The new-card form is submitted by script after Stripe.js has checked the card, and such a
// submit carries no button: here the pressed choice is written into its hidden `pay_choice` field.
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var target = event.target;
    var button = target && target.closest ? target.closest("button[type=submit]") : null;
    if (!button || !button.form) { return; }
    var field = button.form.querySelector("[data-pay-choice-field]");
    if (field) { field.value = button.getAttribute("data-pay-choice") || "full"; }
  }, true);
})();
